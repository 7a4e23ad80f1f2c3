"""The ``ppvit`` command: thin verbs that parse arguments and call the library.

Each verb is a parser function ``_add_<verb>(sub)`` that registers its arguments and sets
``func`` to one call into the library. Errors the user can fix (bad files, bad options)
are raised as ``UserError``/``ValueError`` subclasses and printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence

from . import __version__
from .keys import Key, KeyFileError
from .train import TrainConfig, train


class UserError(Exception):
    """A problem with the user's input, printed as one line without a traceback."""


def _keygen(args: argparse.Namespace) -> None:
    key = Key.generate()
    key.save(args.out)
    print(f"wrote key {args.out} (fingerprint {key.fingerprint}, mode 0600)")


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="write a new secret key file (mode 0600)")
    p.add_argument("out", help="key file to create; an existing file is never overwritten")
    p.set_defaults(func=_keygen)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (``--patch-embed-lr-scale``), help from the field's metadata.

    Defaults are None so that a YAML config or the dataclass default applies when a flag is
    not given; bools become ``--flag/--no-flag``.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) is not typing.Literal:  # unwrap ``X | None``
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        base = str if choices else kind
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type=base, choices=choices, default=None, help=help_)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.quiet:
        given["quiet"] = True
    if args.config:
        return TrainConfig.from_yaml(args.config, **given)
    return TrainConfig(**given)


def _train(args: argparse.Namespace) -> None:
    result = train(_train_config(args), resume=args.resume)
    print(json.dumps(result, indent=2))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a ViT on encrypted (or plain) images")
    p.add_argument("--config", help="YAML file of settings; flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_dataclass_args(p, TrainConfig, skip=("quiet",))
    p.set_defaults(func=_train)


PARSERS = [_add_keygen, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppvit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ppvit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except (UserError, KeyFileError, ValueError, FileNotFoundError) as exc:
        print(f"ppvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppvit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
