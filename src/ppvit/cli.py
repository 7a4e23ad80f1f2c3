"""The ``ppvit`` command: thin verbs that parse arguments and call the library.

Each verb is a parser function ``_add_<verb>(sub)`` that registers its arguments and sets
``func`` to one call into the library. Errors the user can fix (bad files, bad options)
are raised as ``UserError``/``ValueError`` subclasses and printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .keys import Key, KeyFileError


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


PARSERS = [_add_keygen]


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
