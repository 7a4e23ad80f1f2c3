"""Training on `ppvit encrypt` output takes its input size, block size and scheme from the manifest when not
given, refuses a conflicting value in one line, and says so in its first log line (issue 29, item 6)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import SMALL, one_line_error, run_cli


@pytest.fixture
def encrypted(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> Path:
    """The toy dataset encrypted at 16 px (the micro ViT's own input is 32) with shuffle+scramble, blocks of 8."""
    argv = ["encrypt", toy_dataset, tmp_path / "enc", "--key", key_file, "--size", "16", "--block-size", "8"]
    code, _, err = run_cli([*argv, "--scheme", "shuffle+scramble"], capsys)
    assert code == 0, err
    return tmp_path / "enc"


def train_argv(data: Path, out: Path) -> list:
    return ["train", "--data", data, "--model", SMALL, "--out", out, "--epochs", "1", "--batch-size", "8"]


def test_train_takes_size_block_and_scheme_from_the_manifest(
    encrypted: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue: `train --data my-photos-enc` refused with "image size is 112, not 224"."""
    caplog.set_level(logging.INFO)
    argv = [*train_argv(encrypted, tmp_path / "run"), "--precision", "no", "--train-subset", "32"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "adapter" / "ppvit_adapter.json").read_text())
    assert (meta["scheme"], meta["block_size"], meta["model_kwargs"]) == ("shuffle+scramble", 8, {"img_size": 16})
    first = caplog.records[0].getMessage()
    assert "16 px" in first and "shuffle+scramble" in first and "blocks of 8" in first, first
    assert f"manifest of {encrypted}" in first, first


@pytest.mark.parametrize(
    ("flags", "recorded", "asked"),
    [
        (["--img-size", "32"], "input size 16", "32"),
        (["--scheme", "shuffle"], "scheme shuffle+scramble", "shuffle"),
        (["--block-size", "4"], "block size 8", "4"),
    ],
)
def test_train_refuses_a_value_the_manifest_contradicts(
    encrypted: Path, tmp_path: Path, capsys, flags: list[str], recorded: str, asked: str
) -> None:
    err = one_line_error([*train_argv(encrypted, tmp_path / "run"), *flags], capsys)
    assert f"encrypted dataset {encrypted} records {recorded}, not {asked}" in err
    assert not (tmp_path / "run").exists()
