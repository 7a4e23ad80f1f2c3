"""Mistyped command lines: one error line and where to look, not 30 lines of usage."""

from __future__ import annotations

import pytest

from ppvit import cli


@pytest.mark.parametrize(
    ("argv", "verb", "problem"),
    [
        (["train", "--epcohs", "3"], "ppvit train", "unrecognized arguments: --epcohs 3"),
        (["train", "--epochs", "three"], "ppvit train", "argument --epochs: invalid int value: 'three'"),
        (["trian"], "ppvit", "invalid choice: 'trian'"),
        (["client", "train"], "ppvit client train", "the following arguments are required"),
        # taken as 1 without a word
        (["encrypt", "SRC", "DST", "--key", "K", "--workers", "0"], "ppvit encrypt", "--workers: 0: must be at least"),
        (["decrypt", "SRC", "DST", "--key", "K", "--workers", "-3"], "ppvit decrypt", "-3: must be at least"),
    ],
)
def test_a_typo_is_one_error_line_and_the_help_hint_exit_2(argv: list[str], verb: str, problem: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{verb}: error: ") and problem in lines[0], err
    assert lines[1] == f"see `{verb} --help` for its options", err
