"""What every verb shares: the one-line user error, SIGTERM handling, flags from the training schema."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ppvit.train.config import ALIASES, Setting, per_method_defaults, settings

if TYPE_CHECKING:
    from ppvit.data.encrypt import Summary


class UserError(Exception):
    """A problem with the user's input, printed as one line without a traceback."""


class Stopped(KeyboardInterrupt):
    """A SIGTERM, met like Ctrl-C: files being written are removed, finished ones kept."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the body runs, SIGTERM raises :class:`Stopped` (exit 143) instead of killing the process."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of classes, images, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def add_setting_args(parser: argparse.ArgumentParser, items: Iterable[Setting]) -> None:
    """One flag per schema setting (``--patch-embed-lr-scale``), help from the schema.

    Defaults are None so that a YAML config or the schema's default applies when a flag is
    not given; bools become ``--flag/--no-flag``; old names stay as aliases (``--lora-targets``).
    """
    old = {new: old for old, new in ALIASES.items()}
    for item in items:
        flags = ["--" + n.replace("_", "-") for n in (item.name, old.get(item.name)) if n]
        help_ = f"{item.help}{_default_text(item)}"
        if item.type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(*flags, type=item.type, choices=item.choices, default=None, help=help_)


def add_splits_arg(parser: argparse.ArgumentParser) -> None:
    """``--splits`` as ``ppvit train`` has it from the schema: one definition for every verb that reads a source."""
    add_setting_args(parser, (s for s in settings(("data",)) if s.name == "splits"))


def _default_text(item: Setting) -> str:
    """The default as the help shows it: per method where it differs, none where the help says it already."""
    per_method = per_method_defaults(item.name)
    if per_method:
        return " (default per method: " + ", ".join(f"{m} {v}" for m, v in per_method.items()) + ")"
    if item.default is None or "default" in item.help:
        return ""
    return f" (default: {item.default})"


def scheme_args(p: argparse.ArgumentParser) -> None:
    """--key, --scheme, --block-size; a key file's pin is the default, and anything else is refused."""
    p.add_argument("--key", required=True, help="key file (see `ppvit keygen`)")
    p.add_argument("--scheme", help="steps joined by +, e.g. shuffle+scramble (default: the key's pin, else shuffle)")
    p.add_argument(
        "--block-size", type=positive, help="block size; the ViT patch size (default: the key's pin, else 16)"
    )


def add_strict_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: skip it, name it, exit 1 at the end)",
    )


def prediction_line(name: object, label: str, probability: float) -> str:
    """One line of ``predict``'s TSV: a file name or class name holding a tab, a newline or another control
    character (a class folder named so) is written escaped, as Python writes it, so one line stays one answer."""
    return "\t".join((_shown(str(name)), _shown(label), f"{probability:.3f}"))


def _shown(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def report_failed(failed: Sequence[tuple[str, str]], rest: str) -> int:
    """Name each image that failed (unreadable, or refused as too large) on stderr, count them, say what
    became of the ``rest``; the exit status: 1 when any failed. The one rule of every verb that reads many images."""
    for rel, problem in failed:
        print(f"  failed: {_shown(str(rel))}: {problem}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} image{'s' * (len(failed) != 1)} failed (named above); {rest}", file=sys.stderr)
    return 1 if failed else 0


def report_summary(summary: Summary, verb: str, dst: str) -> int:
    print(f"{verb} {summary.written} images into {dst} ({summary.skipped} already there) in {summary.seconds:.1f} s")
    return report_failed(summary.failed, "the others were written")


def counts(text: str, flag: str) -> list[int]:
    """``"5,10,20"`` -> [5, 10, 20]; anything else is one clear error."""
    try:
        counts = [int(v) for v in text.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        raise UserError(
            f"{flag}: expected comma-separated positive numbers of images (e.g. 5,10,20), got {text!r}"
        ) from None
    return counts
