"""The ``ppvit`` command: one module per verb group, each a parser plus one library call."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ppvit._compat import forward

# ``ppvit.cli`` was one module until 0.2: its other names (UserError, PARSERS, ...) still resolve, deprecated
forward(sys.modules[__name__], ("ppvit.cli.commands", "ppvit.cli.common"), "ppvit.cli")


def main(argv: Sequence[str] | None = None) -> int:
    from ppvit.cli.commands import main as run

    return run(argv)


def build_parser():
    from ppvit.cli.commands import build_parser as build

    return build()
