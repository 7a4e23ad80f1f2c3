"""One bad image stops nothing (issue 29, item 4): train, predict and encrypt skip it, name it, count it and
exit 1 at the end; `--strict` stops at the first with one line. No message shows a BytesIO's repr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_tools import toy_run
from conftest import SMALL, one_line_error, run_cli

from ppvit.data.sources import decode

BROKEN = b"\xff\xd8\xff\xe0 a JPEG cut short"


@pytest.fixture
def photos(tmp_path: Path, toy_dataset: Path) -> Path:
    """The toy dataset with one broken JPEG in train/class1/."""
    root = tmp_path / "photos"
    shutil.copytree(toy_dataset, root)
    (root / "train" / "class1" / "broken.jpg").write_bytes(BROKEN)
    return root


@pytest.mark.parametrize("data", [BROKEN, b"no image at all"])
def test_decode_errors_name_no_buffer(data: bytes) -> None:
    """PIL names the buffer it was given: "cannot identify image file <_io.BytesIO object at 0x7f...>"."""
    error = decode("train/a/x.jpg", data).error
    assert error is not None and "BytesIO" not in error and " at 0x" not in error, error


def train_argv(data: Path, out: Path) -> list:
    return ["train", "--data", data, "--scheme", "none", "--model", SMALL, "--out", out, "--epochs", "1"]


def test_train_skips_a_broken_image_names_it_and_exits_1(photos: Path, tmp_path: Path, capsys) -> None:
    """The issue: one broken JPEG aborted the whole run."""
    code, out, err = run_cli([*train_argv(photos, tmp_path / "run"), "--batch-size", "8", "--precision", "no"], capsys)
    assert code == 1, err
    assert "train/class1/broken.jpg" in err and "1 image" in err and "BytesIO" not in err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert list(result["unreadable"]) == ["train/class1/broken.jpg"]
    assert json.loads(out)["test_images"] == 32  # the run finished on the others


def test_train_strict_stops_at_the_first_broken_image(photos: Path, tmp_path: Path, capsys) -> None:
    err = one_line_error([*train_argv(photos, tmp_path / "run"), "--strict"], capsys, "train/class1/broken.jpg")
    assert "BytesIO" not in err and not (tmp_path / "run").exists()


def test_predict_answers_for_the_readable_files_and_names_the_others(photos: Path, tmp_path: Path, capsys) -> None:
    """The issue: one unreadable file in the list and predict printed nothing."""
    run = toy_run(tmp_path / "run", None, None, None)
    good = sorted((photos / "test" / "class0").glob("*.png"))[:2]
    broken = photos / "train" / "class1" / "broken.jpg"
    missing = tmp_path / "gone.png"
    code, out, err = run_cli(["predict", run, good[0], broken, missing, good[1], "--batch-size", "2"], capsys)
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good[0]), str(good[1])]
    assert str(broken) in err and str(missing) in err and "2 images" in err and "BytesIO" not in err
    err = one_line_error(["predict", run, good[0], broken, good[1], "--strict"], capsys, str(broken))
    assert "BytesIO" not in err


def test_encrypt_strict_stops_at_the_first_broken_image(photos: Path, tmp_path: Path, key_file: Path, capsys) -> None:
    argv = ["encrypt", photos, tmp_path / "enc", "--key", key_file, "--block-size", "4"]
    one_line_error([*argv, "--strict"], capsys, "train/class1/broken.jpg")
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "train/class1/broken.jpg" in err and "BytesIO" not in err
