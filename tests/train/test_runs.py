"""A run's life after its first training: one test accuracy whatever reports it, extending it with
more epochs, no validation split, and what a refused run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_config

from ppvit import cli
from ppvit.train.loop import train


def eval_cli(run: Path, data: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    capsys.readouterr()
    assert cli.main(["-q", "eval", str(run), "--data", str(data), *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_result_json_and_eval_report_the_same_test_figures_exactly(
    tmp_path: Path, toy_dataset: Path, key_file: Path, precision: str, capsys
) -> None:
    """result.json said 0.458 where `ppvit eval` of the same run said 0.472: the run measured its
    model in memory (bf16 autocast, another attention kernel), eval the saved adapter in float32."""
    run = tmp_path / "run"
    train(train_config(run, toy_dataset, key_file, epochs=1, precision=precision))
    recorded = json.loads((run / "result.json").read_text())
    evaluated = eval_cli(run, toy_dataset, capsys, "--key", str(key_file))
    assert (evaluated["loss"], evaluated["acc"], evaluated["n"]) == (
        recorded["test_loss"],
        recorded["test_acc"],
        recorded["test_images"],
    )
