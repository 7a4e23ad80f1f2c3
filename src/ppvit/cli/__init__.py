"""The ``ppvit`` command: one module per verb group, each a parser plus one library call."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from ppvit.cli.commands import main as run

    return run(argv)


def build_parser():
    from ppvit.cli.commands import build_parser as build

    return build()
