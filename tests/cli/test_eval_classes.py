"""``ppvit eval`` on a test split whose classes are not exactly the adapter's (hostile tester): a split's labels
index its own class folders, so one missing a class was scored against shifted labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_tools import CLASSES, toy_run

from ppvit.train.inference import evaluate_adapter, iter_predictions


def test_a_test_split_missing_a_class_is_scored_by_class_name(tmp_path: Path, toy_dataset: Path) -> None:
    run = toy_run(tmp_path / "run", None, None, None)
    data = tmp_path / "data"
    shutil.copytree(toy_dataset / "test", data / "test")
    shutil.rmtree(data / "test" / "class0")  # the adapter's first class: every label after it shifted by one
    files = sorted((data / "test").rglob("*.png"))
    predicted = list(iter_predictions(run / "adapter", files))
    by_name = sum(Path(f).parent.name == cls for f, cls, _ in predicted) / len(files)  # independent of eval's labels
    got = evaluate_adapter(run / "adapter", data)
    assert got["n"] == len(files) == 24
    assert got["acc"] == pytest.approx(by_name)
    assert by_name > 0  # the toy run's head tells classes apart: a shift would change the score


def test_a_test_split_with_a_class_the_adapter_does_not_know_is_refused(tmp_path: Path, toy_dataset: Path) -> None:
    run = toy_run(tmp_path / "run", None, None, None)
    data = tmp_path / "data"
    shutil.copytree(toy_dataset / "test", data / "test")
    shutil.copytree(data / "test" / "class3", data / "test" / "zebra")
    with pytest.raises(ValueError, match=rf"class 'zebra' is none of the adapter's {len(CLASSES)}"):
        evaluate_adapter(run / "adapter", data)
