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
        # torch's "Expected a positive image size (H, W), got (0, 0)." naming no flag
        (
            ["transform-model", "O", "--model", "M", "--weights", "W", "--key", "K", "--img-size", "0"],
            "ppvit transform-model",
            "--img-size: 0: must be at least",
        ),
        (["keygen", "K", "--block-size", "-4"], "ppvit keygen", "--block-size: -4: must be at least"),
        (
            ["client", "predict", "X", "--server", "S", "--token-file", "T", "--size", "0"],
            "ppvit client predict",
            "--size: 0: must be at least",
        ),
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
