"""The ``ppvit`` command: thin verbs that parse arguments and call the library.

Each verb group is a module of this package (``data``, ``models``, ``train``,
``experiments``, ``serve``) with a parser function ``add_<verb>(sub)`` that registers its
arguments and sets ``func`` to one call into the library, imported when the verb runs (so
``ppvit --help`` imports no torch). Errors the user can fix (bad files, bad options) are
raised as ``UserError``/``ValueError`` subclasses and printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from ppvit import __version__
from ppvit.cli import data, experiments, models, train
from ppvit.cli.client import add_client
from ppvit.cli.common import UserError
from ppvit.cli.serve import add_serve
from ppvit.crypto.keys import KeyFileError


class _NeverRaised(Exception):
    """Stands for an exception whose module was never imported (so it cannot have been raised)."""


def _from_training(name: str) -> type[BaseException]:
    """Training's exception ``name`` when training ran (its module imported); ``except`` evaluates this only on
    an exception, so a verb that never trains does not import the training stack for it."""
    loop = sys.modules.get("ppvit.train.loop")
    return getattr(loop, name) if loop is not None else _NeverRaised


PARSERS = [  # in the order of `ppvit --help`
    data.add_keygen,
    data.add_encrypt,
    data.add_decrypt,
    data.add_preview,
    data.add_demo,
    models.add_params,
    train.add_train,
    train.add_eval,
    train.add_predict,
    models.add_merge,
    models.add_transform_model,
    experiments.add_pretrain,
    experiments.add_reproduce,
    experiments.add_audit,
    add_serve,
    add_client,
]


QUIET = "no progress bars or info logs"


class _Parser(argparse.ArgumentParser):
    """A mistyped command line is one error line and where to look, not the whole usage (30 lines for
    ``train``); the sub-parsers of every verb are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee `{self.prog} --help` for its options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ppvit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ppvit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    for verb in sub.choices.values():  # `ppvit train -q` as well as `ppvit -q train`
        verb.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET)
    return parser


RERUN = ("encrypt", "decrypt")  # verbs that continue where an interrupted run stopped


def _verb_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the verb (and action: ``client train``) that ``args`` ran, to name it in an error."""
    for dest in ("command", "action"):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, dest, None) not in subs[0].choices:
            break
        parser = subs[0].choices[getattr(args, dest)]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the verb it was given to: `ppvit train: error: unrecognized arguments: --epcohs 3`
        _verb_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # not a line per request of `ppvit client`, nor per model timm builds, nor matplotlib's "generated new
    # fontManager" (its font cache built on first use) between two epochs' lines of a first `ppvit train`
    for chatty in ("httpx", "timm", "matplotlib"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        code = args.func(args)
    except (UserError, KeyFileError, ValueError, FileNotFoundError) as exc:
        print(f"ppvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except _from_training("TrainingStopped") as exc:  # a checkpoint was saved; the message says how to resume
        print(f"ppvit {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except _from_training("TrainingDiverged") as exc:  # a NaN loss (too high a rate): what to try, in one line
        print(f"ppvit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the system's refusal (a full disk, a read-only folder): one line naming the file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ppvit {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where a verb turns it into Stopped
        signum = getattr(exc, "signum", signal.SIGINT)
        again = " (finished files are kept: run the same command again to continue)" if args.command in RERUN else ""
        print(f"ppvit {args.command}: interrupted by {signal.Signals(signum).name}{again}", file=sys.stderr)
        return 128 + signum
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
