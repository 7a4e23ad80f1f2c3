"""A run's life after its first training: one test accuracy whatever reports it, extending it with
more epochs, no validation split, and what a refused run leaves behind."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import adapter_tensors, train_config, train_flags

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


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up then cosine to 0, written out (not ppvit's function)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_resume_with_more_epochs_extends_a_finished_run_with_a_new_schedule(
    tmp_path: Path, toy_dataset: Path, capsys
) -> None:
    """`ppvit train --resume --out RUN --epochs 4` on a finished 2-epoch run answered "--resume with
    different settings (epochs)". It now trains epochs 3-4 from the last weights under a new warm-up +
    cosine schedule, keeps the first two epochs' records, and records both schedules."""
    run = tmp_path / "run"
    train(train_config(run, toy_dataset, None, scheme="none", epochs=2))
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert cli.main(["-q", "train", "--resume", "--out", str(run), "--epochs", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[:2] == before
    # 72 training images (96, a quarter held out), batch 8: 9 steps an epoch; warm-up 0.5 epoch: round(4.5) = 4
    steps, warmup, peak = 9, 4, 3e-3
    assert rows[1]["lr"] == pytest.approx(lr_at(17, 2 * steps, warmup, peak), abs=1e-12)  # the first schedule's end
    for row, last in ((rows[2], steps - 1), (rows[3], 2 * steps - 1)):  # the new one: epochs 3-4 alone
        assert row["lr"] == pytest.approx(lr_at(last, 2 * steps, warmup, peak), rel=1e-9)
    result = json.loads((run / "result.json").read_text())
    assert result == printed and result["epochs"] == 4
    assert result["schedules"] == [
        {"start_epoch": 0, "start_step": 0, "epochs": 2},
        {"start_epoch": 2, "start_step": 2 * steps, "epochs": 4},
    ]
    val = [r["val_acc"] for r in rows]
    assert result["best_epoch"] == 1 + val.index(max(val)) and result["best_val_acc"] == max(val)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 4


def test_resume_refuses_shortening_and_other_settings_saying_what_to_do(
    tmp_path: Path, toy_dataset: Path, capsys
) -> None:
    run = tmp_path / "run"
    train(train_config(run, toy_dataset, None, scheme="none", epochs=2))
    capsys.readouterr()
    saved = (run / "checkpoint.pt").read_bytes()
    for flags, expected in (
        (["--epochs", "1"], "has trained 2 epochs; --epochs 1 would not extend it: give more than 2"),
        (["--lr", "0.1"], "different settings (lr): a run keeps its settings"),
        (["--lr", "0.1", "--epochs", "5"], "different settings (lr): a run keeps its settings"),
    ):
        assert cli.main(["-q", "train", "--resume", "--out", str(run), *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and expected in err, err
        assert "--out" in err or "more than" in err
    assert (run / "checkpoint.pt").read_bytes() == saved
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 2


def test_no_validation_split_keeps_the_last_epoch_and_says_so(
    tmp_path: Path, toy_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--train-subset 16` left no validation image (10% of 4 a class rounds to 0) and the run ended
    in `[Errno 2] No such file or directory: '.../best.pt'`."""
    run = tmp_path / "run"
    cfg = train_config(run, toy_dataset, None, scheme="none", epochs=2, train_subset=16, val_fraction=0.1)
    with caplog.at_level("INFO", logger="ppvit.train"):
        result = train(cfg)
    said = [m for r in caplog.records if "validation" in (m := r.getMessage()) and not m.startswith("epoch ")]
    assert len(said) == 1 and "no validation images" in said[0] and "last epoch" in said[0], said
    assert result.best_epoch == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["val_acc"], r["val_loss"]) for r in rows] == [(None, None)] * 2
    last = torch.load(run / "checkpoint.pt", weights_only=False)["model"]  # the last epoch's weights
    saved = adapter_tensors(run)
    assert set(saved) == set(last) and all(torch.equal(saved[n], last[n]) for n in last)
    assert json.loads((run / "result.json").read_text())["best_val_acc"] is None


def test_training_output_has_no_matplotlib_font_cache_line(tmp_path: Path, toy_dataset: Path) -> None:
    """matplotlib builds its font cache on first use and said "generated new fontManager" between two
    epochs' lines of a first `ppvit train`."""
    cfg = train_config(tmp_path / "run", toy_dataset, None, scheme="none", epochs=1)
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "fresh-matplotlib")}  # no font cache yet
    done = subprocess.run(
        [sys.executable, "-m", "ppvit.cli", "train", *train_flags(cfg)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "curves.png").exists() and any((tmp_path / "fresh-matplotlib").iterdir())
    assert "epoch 1: train loss" in done.stderr and "fontManager" not in done.stderr + done.stdout, done.stderr


def test_a_refused_run_leaves_no_empty_parent_folders_but_keeps_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A failed `ppvit train` (default --out runs/run) left an empty runs/ behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # a user's empty folder: never removed
    for out in ("runs/run", "a/b/run", "mine/run"):
        code = cli.main(["-q", "train", "--out", out, "--data", "missing", "--scheme", "none", "--precision", "no"])
        assert code == 2 and "missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not any((tmp_path / "mine").iterdir())


def test_a_run_result_listing_many_unreadable_images_is_read_back(tmp_path: Path) -> None:
    """130,000 images left out made a result.json of 17 MB, which the JSON reader's 16 MB bound refused after the
    run had trained (reproduce's cells, pretrain; second reader)."""
    from ppvit.train.runs import RunResult

    fields = dict(test_acc=0.5, test_loss=1.2, test_images=4, best_epoch=1, best_val_acc=0.5, epochs=1)
    fields.update(method="full", scheme="plain", num_classes=4, trainable_params=1, train_seconds=1.0)
    unreadable = {f"train/cat/{i:08d}.png": "cannot decode (truncated file) " + "x" * 90 for i in range(140_000)}
    RunResult(**fields, images_per_s=None, peak_rss_mb=1.0, processes=1, precision="no", unreadable=unreadable).write(
        tmp_path / "r.json"
    )
    assert (tmp_path / "r.json").stat().st_size > 16 << 20
    assert RunResult.read(tmp_path / "r.json").unreadable == unreadable


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({}, None),
        ({"test_loss": None}, None),  # a diverged model's NaN loss, as JSON writes it
        ({"test_acc": 5}, "test_acc 5: must be a fraction from 0 to 1"),
        ({"best_val_acc": -0.5}, "best_val_acc -0.5: must be a fraction from 0 to 1"),
        ({"test_acc": None}, "test_acc None: must be a finite number"),
        ({"epochs": "3"}, "epochs '3': must be an integer"),
        ({"surprise": 1}, "cannot be read"),
    ],
    ids=["as written", "loss null", "acc 5", "val acc below 0", "acc null", "epochs text", "unknown field"],
)
def test_a_run_result_edited_by_hand_is_refused_in_one_line(tmp_path: Path, edit: dict, says: str | None) -> None:
    """`test_acc: 5` in a cell's result.json became 500.00 in reproduce's table; null was a traceback."""
    from ppvit.train.runs import RunResult

    fields = dict(test_acc=0.5, test_loss=1.2, test_images=4, best_epoch=1, best_val_acc=0.5, epochs=1)
    fields.update(method="full", scheme="plain", num_classes=4, trainable_params=1, train_seconds=1.0)
    RunResult(**fields, images_per_s=None, peak_rss_mb=1.0, processes=1, precision="no").write(tmp_path / "r.json")
    doc = {**json.loads((tmp_path / "r.json").read_text()), **edit}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    if says is None:
        assert RunResult.read(tmp_path / "r.json").test_acc == 0.5
        return
    with pytest.raises(ValueError, match=rf"run result {tmp_path / 'r.json'}: {says}"):
        RunResult.read(tmp_path / "r.json")


@pytest.fixture(scope="module")
def keyed_run(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> Path:
    """A finished one-epoch run with a key, its data and key copied beside it (each case edits its own copy)."""
    from ppvit.crypto.keys import Key

    base = tmp_path_factory.mktemp("keyed")
    shutil.copytree(toy_dataset, base / "data")
    Key.generate().save(base / "k.key")
    train(train_config(base / "run", base / "data", base / "k.key", epochs=1))
    return base


def _damage(name: str, run: Path, where: Path) -> None:
    """One way a run's key, data or files can change between its stop and its --resume."""
    from ppvit.crypto.keys import Key

    ckpt = run / "checkpoint.pt"
    if name == "key swapped":
        (where / "k.key").unlink()
        Key.generate().save(where / "k.key")
    elif name == "class added":
        shutil.copytree(where / "data" / "train" / "class0", where / "data" / "train" / "class9")
    elif name == "class renamed":
        (where / "data" / "train" / "class3").rename(where / "data" / "train" / "classX")
    elif name == "best truncated":
        (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:100])
    elif name == "best of other shapes":
        torch.save({n: t[:1] for n, t in torch.load(run / "best.pt").items()}, run / "best.pt")
    else:
        payload = torch.load(ckpt, weights_only=False)
        edits = {
            "a list": lambda p: [p],
            "no model": lambda p: {k: v for k, v in p.items() if k != "model"},
            "an extra field": lambda p: {**p, "bogus": 1},
            "epoch as text": lambda p: {**p, "epoch": "x"},
            "head of 5 classes": lambda p: {
                **p,
                "model": {**p["model"], "head.weight": torch.zeros(5, p["model"]["head.weight"].shape[1])},
            },
        }
        torch.save(edits[name](payload), ckpt)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (
            "key swapped",
            r"checkpoint .*checkpoint\.pt: trained with key fingerprint \w+, this run has \w+: resume with",
        ),
        ("class added", r"trained with classes class0, class1, class2, class3, this run has class0, .*class9"),
        ("class renamed", r"trained with classes class0, class1, class2, class3, this run has .*classX"),
        ("a list", r"checkpoint .*: damaged \(not a ppvit checkpoint\)"),
        ("no model", r"checkpoint .*: damaged \(not a ppvit checkpoint\)"),
        ("an extra field", r"checkpoint .*: damaged \(.*'bogus'"),
        ("epoch as text", r"checkpoint .*: damaged \(epoch 'x': must be an integer\)"),
        ("head of 5 classes", r"checkpoint .*: head\.weight has shape \(5, 48\), this run's \(4, 48\)"),
        ("best truncated", r"best weights .*best\.pt: cannot be read"),
        ("best of other shapes", r"best weights .*best\.pt: \S+ has shape"),
    ],
)
def test_a_resume_refuses_another_key_other_classes_and_damaged_files_in_one_line(
    tmp_path: Path, keyed_run: Path, damage: str, says: str, capsys
) -> None:
    """A key replaced at the run's key path was trained on (config.yaml names the path, not the key): the adapter's
    fingerprint changed silently; a class added was a traceback from copy_, one renamed trained on under the old
    name; checkpoints and best weights that load but are not what ppvit wrote were tracebacks (hostile tester)."""
    where = tmp_path / "copy"
    shutil.copytree(keyed_run, where)
    config = where / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(keyed_run), str(where)))
    _damage(damage, where / "run", where)
    before = (where / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(["-q", "train", "--resume", "--out", str(where / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(says, err), err
    assert (where / "run" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("out", ["data", "data/train", "data/train/new"])
def test_a_run_folder_in_its_data_or_holding_it_is_refused_before_anything_is_written(
    tmp_path: Path, toy_dataset: Path, out: str, capsys
) -> None:
    """`train --out DATA/train` wrote config.yaml, checkpoints, curves.png and adapter/ into the dataset (exit 0); the
    next run on it failed on curves.png, and an adapter/ folder alone would have become a class (hostile tester)."""
    shutil.copytree(toy_dataset, tmp_path / "data")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    argv = ["-q", "train", "--out", str(tmp_path / out), "--data", str(tmp_path / "data"), "--scheme", "none"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"run folder {tmp_path / out}: overlaps the data" in err, err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before


def test_a_run_folder_may_hold_its_data(tmp_path: Path, toy_dataset: Path) -> None:
    """`--data data --out .` trained before the check above and writes nothing into data/ (second reader)."""
    shutil.copytree(toy_dataset, tmp_path / "data")
    train(train_config(tmp_path, tmp_path / "data", None, scheme="none", epochs=1, train_subset=8, test_subset=8))
    assert (tmp_path / "result.json").is_file() and not any(
        p.name == "curves.png" for p in (tmp_path / "data").rglob("*")
    )
