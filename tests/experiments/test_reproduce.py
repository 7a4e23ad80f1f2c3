"""`reproduce`: cells, skipping finished ones, failures reported, tables and plot; the paper preset's wiring."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SMALL, assert_no_key_material
from safetensors.torch import load

from ppvit import cli
from ppvit.crypto.keys import Key
from ppvit.experiments import budget as budgets
from ppvit.experiments import cells as cell_runs
from ppvit.experiments import reproduce as runner
from ppvit.experiments.cells import cell_config
from ppvit.experiments.presets import PRESETS, MethodSettings, Preset, Upstream
from ppvit.experiments.reproduce import reproduce, resolve_weights
from ppvit.models.backbones import create_backbone, input_size, patch_size
from ppvit.train.config import TrainConfig
from ppvit.train.runs import RunResult

TOY = Preset(
    "toy",
    "test preset",
    TrainConfig.from_flat(
        model=SMALL,
        part="1/2",
        batch_size=8,
        epochs=2,
        val_fraction=0.25,
        precision="no",
        warmup_epochs=0.5,
    ),
    {"linear": MethodSettings(lr=5e-3)},
    ("none", "shuffle"),
    (0, 1),
    upstream=Upstream(epochs=2, batch_size=8),
)


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_toy_reproduction_end_to_end(tmp_path: Path, toy_dataset: Path) -> None:
    table = reproduce(TOY, tmp_path / "out", toy_dataset, progress=False)
    assert table.upstream_acc is not None and 0 <= table.upstream_acc <= 1
    assert [(r.method, r.data, r.seeds) for r in table.rows] == [("linear", "plain", 2), ("linear", "shuffle", 2)]
    for row in table.rows:
        cells = [
            c
            for c in table.cells
            if c.method == row.method and c.scheme == ("none" if row.data == "plain" else row.data)
        ]
        accs = [100 * c.result.test_acc for c in cells]
        assert row.acc_mean == pytest.approx(sum(accs) / 2)
        assert row.acc_std == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)  # sample sd of two values
        assert row.peak_mb and row.peak_mb > 50
    # exact counts: linear = a head of 4 classes on a 48-dim model
    linear = table.rows[0]
    assert linear.trainable == 48 * 4 + 4 == table.cells[0].result.trainable_params
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.csv", "results.json", "results.png", "cells"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and rows[1]["data"] == "shuffle"
    assert "upstream (plain) test accuracy" in (out / "results.md").read_text()

    # a rerun skips every finished cell: results are read back, not retrained
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("result.json")}
    again = reproduce(TOY, out, toy_dataset, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("result.json")} == stamp
    assert [r.acc_mean for r in again.rows] == [r.acc_mean for r in table.rows]
    key_file = out / "reproduce.key"  # generated next to the outputs; no other file may hold it
    assert_no_key_material(out, Key.load(key_file), skip=[key_file])


def test_failed_cells_are_reported_not_hidden(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = cell_runs.run_cell, []

    def second_fails(cfg: TrainConfig, spawn: bool = True) -> RunResult:
        calls.append(cfg.run.out)
        if len(calls) == 2:
            raise ValueError("batch size 10000 is larger than the training set")
        return real(cfg, spawn)

    monkeypatch.setattr(cell_runs, "run_cell", second_fails)
    preset = Preset("two", "", TOY.base, {"linear": MethodSettings(lr=5e-3)}, ("none", "shuffle"), (0,))
    table = reproduce(
        preset, tmp_path / "out", toy_dataset, weights=None, pretrained=False, progress=False, one_process=True
    )  # the cells' spawned processes are another test's
    assert table.rows[0].acc_mean is not None and table.rows[1].acc_mean is None
    assert table.rows[1].errors[0].startswith("ValueError: batch size 10000 is larger than the training set")
    assert "Failed cells:" in table.markdown()
    key_file = tmp_path / "out" / "reproduce.key"
    assert_no_key_material([tmp_path / "out", table.markdown()], Key.load(key_file), skip=[key_file])


def test_a_failing_first_cell_stops_the_run_before_the_others(tmp_path: Path, toy_dataset: Path) -> None:
    broken = Preset(
        "broken", "", TOY.base.replace(batch_size=10_000), {"melo": MethodSettings(lr=1e-3)}, ("shuffle", "none"), (0,)
    )  # larger than the training set: every cell would fail the same way
    with pytest.raises(ValueError, match=r"the first cell \(melo, shuffle, seed 0\) failed, so every cell would"):
        reproduce(
            broken, tmp_path / "out", toy_dataset, weights=None, pretrained=False, progress=False, one_process=True
        )
    assert not (tmp_path / "out" / "results.md").exists() and not (tmp_path / "out" / "cells" / "melo-none-s0").exists()


def test_data_it_cannot_use_is_refused_before_any_cell(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("PPVIT_CIFAR10", raising=False)
    assert cli.main(["reproduce", "--preset", "small-demo", "--out", str(tmp_path / "a")]) == 2
    assert "no data: pass --data" in capsys.readouterr().err
    encrypted = tmp_path / "enc"
    assert (
        cli.main(
            ["-q", "encrypt", str(toy_dataset), str(encrypted), "--key", str(tmp_path / "k.key"), "--block-size", "4"]
        )
        == 2
    )  # no key yet
    Key.generate().save(tmp_path / "k.key")
    assert (
        cli.main(
            ["-q", "encrypt", str(toy_dataset), str(encrypted), "--key", str(tmp_path / "k.key"), "--block-size", "4"]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        cli.main(["reproduce", "--preset", "small-demo", "--data", str(encrypted), "--out", str(tmp_path / "b")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encrypted (`ppvit encrypt` output); reproduce needs the plain images" in err[0]
    assert not (tmp_path / "a" / "cells").exists() and not (tmp_path / "b" / "cells").exists()


def test_results_say_what_they_ran_on(tmp_path: Path, toy_dataset: Path) -> None:
    """Parameter counts too: at --img-size 16 the table counted full's at the preset's size (hostile tester)."""
    one = Preset("one", "", TOY.base, {"full": MethodSettings(lr=5e-3)}, ("none",), (0,))
    table = reproduce(
        one,
        tmp_path / "out",
        toy_dataset,
        weights=None,
        pretrained=False,
        overrides={"epochs": 1, "img_size": 16},
        progress=False,
        one_process=True,
    )
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]
    assert saved["data"] == str(toy_dataset) and saved["overrides"] == {"epochs": 1, "img_size": 16}
    assert saved["key_fingerprint"] == Key.load(tmp_path / "out" / "reproduce.key").fingerprint
    assert "**overrides of the preset: epochs=1, img_size=16** (not the preset's protocol)" in table.markdown()
    trained = RunResult.read(tmp_path / "out" / "cells" / "full-none-s0" / "result.json").trainable_params
    at_32 = sum(p.numel() for p in create_backbone(SMALL, num_classes=4).parameters())
    assert table.rows[0].trainable == trained == at_32 - 48 * (64 - 16)  # 48 values a position, 16 of 64 kept


def test_every_preset_builds_each_cell_config_on_its_geometry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cell's config is valid, blocks equal the model's patches, and the input size divides into them.

    A cell's settings are composed here independently of ``cell_config``: the preset's base, then
    the method's own settings (where set), then the run-wide ones, then the cell's.
    """
    common = {"data": str(tmp_path / "d"), "epochs": 1}
    for preset in PRESETS.values():
        with torch.device("meta"):
            model = create_backbone(preset.model, num_classes=10, img_size=preset.base.backbone.img_size)
        side, patch = input_size(model), patch_size(model)
        assert side % patch == 0, preset.name
        for method, settings in preset.methods.items():
            for scheme in preset.schemes:
                cfg = cell_config(preset, method, scheme, 1, tmp_path / "c", tmp_path / "k", **common)
                want = {**preset.base.flat(), "method": method}
                want |= {name: value for name, value in dataclasses.asdict(settings).items() if value is not None}
                want |= common
                key = None if scheme == "none" else str(tmp_path / "k")
                want |= {"out": str(tmp_path / "c"), "scheme": scheme, "seed": 1, "quiet": True, "key": key}
                assert cfg.flat() == want, (preset.name, method, scheme)
        # where the weights come from: an upstream run here, or ImageNet weights (a file or timm's download)
        if preset.upstream is not None:
            assert preset.weights_env is None, preset.name
        elif preset.weights_env is not None:
            monkeypatch.delenv(preset.weights_env, raising=False)
            with pytest.raises(ValueError, match=f"preset {preset.name} needs .* set {preset.weights_env} or pass"):
                resolve_weights(preset, None, None)
        else:
            assert resolve_weights(preset, None, None) == (None, True), preset.name  # the download


def test_upstream_epochs_flag_changes_only_the_pretraining_epochs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = []

    def fake_pretrain(model: str, upstream: Upstream, data: object, quiet: bool) -> tuple[Path, RunResult]:
        seen.append(upstream)
        return Path("w"), RunResult(0.5, 1.0, 10, 1, 0.5, 1, "full", "plain", 10, 1, 1.0, 1.0, 1.0, 1, "no")

    monkeypatch.setattr(runner, "pretrain", fake_pretrain)
    small = PRESETS["small-cpu"]
    assert cli.main(["-q", "pretrain", "--preset", "small-cpu", "--upstream-epochs", "10"]) == 0
    assert seen == [dataclasses.replace(small.upstream, epochs=10)] and small.upstream.epochs != 10
    assert cli.main(["-q", "reproduce", "--preset", "paper", "--upstream-epochs", "3"]) == 2
    assert cli.main(["-q", "pretrain", "--upstream-epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "paper starts from ImageNet weights" in err and "at least 1" in err


@pytest.mark.slow
@pytest.mark.data
def test_paper_preset_wiring_on_a_tiny_subset(tmp_path: Path) -> None:
    """ViT-B/16 at 224x224 with random weights (offline), 16x16 shuffling, one epoch on 64 images."""
    if not os.environ.get("PPVIT_CIFAR10"):
        pytest.skip("PPVIT_CIFAR10 is not set")
    args = [
        "-q",
        "reproduce",
        "--preset",
        "paper",
        "--out",
        str(tmp_path / "out"),
        "--no-pretrained",
        "--epochs",
        "1",
        "--train-subset",
        "80",
        "--test-subset",
        "20",
    ]
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "out" / "cells" / "lora-pe-shuffle-s0" / "result.json").read_text())
    assert result["trainable_params"] == 745_738 and result["test_images"] == 20


def test_the_estimate_measures_each_method_and_counts_every_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell without a training subset (the gpu preset's) counts with the whole training split: it printed
    "about 0 min for 0 of 3 cells" on an H200 (issue 30)."""
    speeds = {"linear": 200.0, "melo": 50.0}
    monkeypatch.setattr(budgets, "training_speed", lambda cfg: speeds[cfg.method.name])
    monkeypatch.setattr(budgets, "cell_overhead_seconds", lambda cfg, spawn=True: 10.0)
    monkeypatch.setattr(budgets, "training_images", lambda cfg: 2_000)
    sized = TOY.base.replace(train_subset=1_000, test_subset=500, epochs=2, val_fraction=0.1, precision="no")
    cells = [sized.replace(method="linear"), sized.replace(method="melo"), TOY.base.replace(method="melo")]
    est = runner.estimate(cells)
    # linear: 10 + 900 x 2 / 200 + (100 x 2 + 500) / 200 = 22.5 s; melo: 10 + 900 x 2 / 50 + 700 / 200 = 49.5 s;
    # melo on the whole split (2,000 images, a quarter held out, 10,000 test images):
    # 10 + 10,000 / 200 + 2,000 x (0.75 x 2 / 50 + 0.25 x 2 / 200) = 125 s
    assert est.seconds == pytest.approx(197.0) and (est.sized, est.cells) == (2, 3)
    assert est.line().startswith("estimate: about 3 min for 3 cells") and "linear 200, melo 50" in est.line()
    assert "on cpu" in est.line()
    assert est.fit(60) is None  # an unsized cell (the whole dataset) cannot be shrunk
    both = runner.estimate(cells[:2])
    # fixed 2 x 10 + 2 x 500 / 200 = 25 s; per image 1.8 / 200 + 0.2 / 200 + 1.8 / 50 + 0.2 / 200 = 0.047 s
    assert both.fixed == pytest.approx(25.0) and both.per_image == pytest.approx(0.047)
    assert both.fit(100) is None  # 72 s is within 80% of 100 s
    assert both.fit(80) == 820  # (0.8 x 80 - 25) / 0.047 = 829.8, to two digits
    assert both.fit(40) == budgets.MIN_TRAIN_SUBSET  # (32 - 25) / 0.047 = 149: the floor


@pytest.mark.parametrize("key_init", [False, True])
def test_training_speed_times_a_step_of_every_cell(key_init: bool) -> None:
    """Measured, not monkeypatched: a key holder's cell (`reproduce --set key_init=true`) failed here before any
    cell ran ("--key-init needs the key"): the speed probe builds its model without a cipher."""
    cfg = TOY.base.replace(method="lora-pe", key_init=key_init, precision="no", batch_size=4)
    assert 0 < budgets.training_speed(cfg, steps=1) < 1e6


def test_a_cell_without_a_subset_counts_its_part_of_the_training_split(toy_dataset: Path) -> None:
    cfg = TOY.base.replace(data=str(toy_dataset))  # part 1/2 of 96 training images
    assert budgets.training_images(cfg) == 48


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_a_cells_overhead_is_measured_by_a_trial_cell_that_leaves_nothing(tmp_path: Path, toy_dataset: Path) -> None:
    cfg = TOY.base.replace(method="linear", scheme="none", data=str(toy_dataset), out=str(tmp_path / "cell"))
    seconds = budgets.cell_overhead_seconds(cfg)
    assert 0 < seconds < 300 and not (tmp_path / "cell").exists()
    with pytest.raises(ValueError, match=r"a trial cell \(linear, a few images\) failed, so every cell would"):
        budgets.cell_overhead_seconds(cfg.replace(data=str(tmp_path / "nothing-here")))


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_a_slow_machine_trains_fewer_images_within_the_budget_and_says_so(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget the measured speed cannot meet shrinks every cell's training subset, once, before
    the first cell; the table states it, and a rerun (a faster measurement now) keeps the size."""
    monkeypatch.setattr(budgets, "training_speed", lambda cfg: 10.0)
    monkeypatch.setattr(budgets, "cell_overhead_seconds", lambda cfg, spawn=True: 1.0)
    monkeypatch.setattr(budgets, "MIN_TRAIN_SUBSET", 8)
    preset = TOY.select(seeds=(0,), minutes=0.2, base=TOY.base.replace(train_subset=80, test_subset=16))
    out = tmp_path / "out"
    table = reproduce(preset, out, toy_dataset, progress=False)
    budget = json.loads((out / budgets.BUDGET_FILE).read_text())
    # per cell: 1 + 16 / 10 = 2.6 s fixed; per image 0.75 x 2 / 10 + 0.25 x 2 / 10 = 0.2 s; two cells:
    # (0.8 x 12 - 5.2) / 0.4 = 11
    assert (budget["train_subset"], budget["preset_train_subset"]) == (11, 80), budget
    for cell in ("linear-none-s0", "linear-shuffle-s0"):
        assert TrainConfig.load(out / "cells" / cell / "config.yaml").data.train_subset == 11
    assert "sized to the 0.2-minute budget: 11 training images instead of 80" in (out / "results.md").read_text()
    assert table.settings["budget"]["train_subset"] == 11
    monkeypatch.setattr(budgets, "training_speed", lambda cfg: 1e6)
    assert reproduce(preset, out, toy_dataset, progress=False).settings["budget"]["train_subset"] == 11
    (out / "cells" / "linear-shuffle-s0" / "result.json").unlink()  # as if interrupted before the last cell
    again = reproduce(preset, out, toy_dataset, progress=False, minutes=0)  # the folder's size still stands
    assert again.settings["budget"]["train_subset"] == 11
    assert TrainConfig.load(out / "cells" / "linear-shuffle-s0" / "config.yaml").data.train_subset == 11
    quick = reproduce(preset, tmp_path / "quick", toy_dataset, progress=False)  # fast enough: the preset's size
    assert "budget" not in quick.settings and not (tmp_path / "quick" / budgets.BUDGET_FILE).exists()
    assert TrainConfig.load(tmp_path / "quick" / "cells" / "linear-none-s0" / "config.yaml").data.train_subset == 80


def test_the_gpu_preset_fits_9_minutes_at_the_throughput_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """presets.py's arithmetic, through the estimate reproduce prints: 24 cells at the issue-30 targets."""
    from ppvit.experiments.presets import PRESETS

    gpu = PRESETS["gpu"]
    targets = {"full": 20_000.0, "lora-pe": 20_000 / 0.75, "melo": 20_000 / 0.75, "linear": 60_000.0}
    monkeypatch.setattr(budgets, "training_speed", lambda cfg: targets[cfg.method.name])
    monkeypatch.setattr(budgets, "cell_overhead_seconds", lambda cfg, spawn=True: 3.0)
    cells = [
        cell_runs.cell_config(gpu, m, s, seed, Path("x"), Path("k"))
        for seed in gpu.seeds
        for m in gpu.methods
        for s in gpu.schemes
    ]
    est = runner.estimate(cells)
    # per seed and scheme: 4 cells x (3 s + 10,000 test + 10 x 5,000 validation images at 60,000/s) = 16 s, and
    # 10 x 45,000 training images at 20,000 (full), 26,667 (lora-pe, melo) and 60,000 (linear) a second = 63.75 s
    assert len(cells) == 24 and est.sized == 24
    assert est.seconds == pytest.approx(6 * (16 + 63.75)) and est.seconds < gpu.minutes * 60  # 478.5 s
    lrs = {m: cell_runs.cell_config(gpu, m, "none", 0, Path("x"), Path("k")).optim.lr for m in gpu.methods}
    assert lrs == pytest.approx({"full": 2e-4, "linear": 2e-2, "melo": 6e-3, "lora-pe": 6e-3})  # 2x the recipes


def test_one_process_trains_the_cells_here_without_spawning(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cell was spawned")

    monkeypatch.setattr(cell_runs, "ProcessPoolExecutor", no_spawn)
    one = TOY.select(seeds=(0,), schemes=("none",))
    table = reproduce(one, tmp_path / "out", toy_dataset, progress=False, overrides={"epochs": 1}, one_process=True)
    assert table.cells[0].error is None and table.cells[0].result.epochs == 1
    with pytest.raises(ValueError, match="a cell was spawned"):  # the default spawns (and fails here)
        reproduce(one, tmp_path / "other", toy_dataset, progress=False, overrides={"epochs": 1})


def test_a_failed_reproduce_removes_the_key_and_folders_it_made_only(tmp_path: Path, toy_dataset: Path) -> None:
    """A reproduce that failed left OUT/reproduce.key (and OUT) behind; a user's own key stays."""
    broken = Preset(
        "broken", "", TOY.base.replace(batch_size=10_000), {"linear": MethodSettings(lr=1e-3)}, ("shuffle",), (0,)
    )
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match="the first cell"):
        reproduce(broken, out, toy_dataset, weights=None, pretrained=False, progress=False)
    assert not (out / "reproduce.key").exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "cells",
        "cells/linear-shuffle-s0",
        "cells/linear-shuffle-s0/.lock",  # any run folder's
        "cells/linear-shuffle-s0/stderr.log",  # named by the error: kept
    ]
    mine = tmp_path / "mine.key"
    Key.generate().save(mine)
    with pytest.raises(ValueError, match="the first cell"):
        reproduce(
            broken,
            tmp_path / "other",
            toy_dataset,
            key=mine,
            weights=None,
            pretrained=False,
            progress=False,
            one_process=True,
        )
    assert mine.exists()


def test_a_stop_signal_in_a_cell_stops_the_run_not_just_that_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the GPU (gpu_check.sh's timeout) a SIGTERM stopped one cell and reproduce went on to the next."""
    import pickle
    from types import SimpleNamespace

    from ppvit.experiments.results import Cell
    from ppvit.train.loop import TrainingStopped

    ran: list[str] = []

    def fake_run_cell(cfg: TrainConfig, spawn: bool = True) -> SimpleNamespace:
        ran.append(cfg.run.out)
        if len(ran) == 2:
            raise TrainingStopped("stopped by SIGTERM at epoch 3, step 17", 15)
        return SimpleNamespace(test_acc=0.5)

    monkeypatch.setattr(cell_runs, "run_cell", fake_run_cell)
    todo = [Cell("linear", "none", seed) for seed in range(4)]
    configs = [TOY.base.replace(out=str(tmp_path / str(i))) for i in range(4)]
    with pytest.raises(TrainingStopped) as caught:
        cell_runs.run_cells(todo, configs, "toy", progress=False, spawn=False)
    assert len(ran) == 2 and caught.value.signum == 15  # the third and fourth cells never started
    assert str(caught.value) == (  # not the cell's own `--resume`, which reproduce lacks
        f"stopped by SIGTERM in the cell linear none seed 1, its checkpoint kept in {tmp_path / '1'}: the same "
        "reproduce command continues it"
    )
    again = pickle.loads(pickle.dumps(caught.value))  # as it comes back from a spawned cell
    assert type(again) is TrainingStopped and again.signum == 15 and str(again) == str(caught.value)


STOPPED_CELL = """
import pickle, sys
from ppvit.experiments.cells import run_cell
from ppvit.train.loop import TrainingStopped
try:
    run_cell(pickle.loads(open(sys.argv[1], "rb").read()))
except TrainingStopped as exc:
    print("stopped", exc.signum, flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("signum", [15, 9], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_reproduce_alone_stops_its_cell_with_a_checkpoint(
    tmp_path: Path, toy_dataset: Path, key_file: Path, signum: int
) -> None:
    """`kill PID` of a reproduce run once left the cell's spawned process training, orphaned, holding the lock;
    after `kill -9 PID` it trained on, then waited forever for work (hostile tester): it stops as by a SIGTERM."""
    import pickle
    import signal
    import subprocess
    import sys
    import time

    from conftest import train_config

    from ppvit.train.runs import CHECKPOINT_FILE, LOCK_FILE

    out = tmp_path / "cell"
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(train_config(out, toy_dataset, key_file, epochs=10_000)))
    parent = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CELL, str(tmp_path / "cfg.pkl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT_FILE).exists():  # the cell's process trains, its handler installed
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()[1][-3000:]
            time.sleep(0.2)
        child = int((out / LOCK_FILE).read_text())
        assert child != parent.pid
        parent.send_signal(signum)  # to the parent only, as `kill PID` does
        stdout, stderr = parent.communicate(timeout=120)
        if signum == signal.SIGTERM:
            assert parent.returncode == 3 and stdout.split() == [b"stopped", b"15"], stderr[-3000:]
        with pytest.raises(ProcessLookupError):  # the cell's process is gone, not training on
            for _ in range(300):
                os.kill(child, 0)
                time.sleep(0.1)
    finally:
        parent.kill()
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(child, signal.SIGKILL)  # an orphan of a failed run must not outlive the test
    assert torch.load(out / CHECKPOINT_FILE, weights_only=False)  # what a rerun resumes from


def test_a_cached_upstream_model_cut_short_is_merged_again_not_used(
    toy_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`pretrain` took a cached weights file cut to 1,000 bytes as good (every cell then failed to load it)."""
    upstream = Upstream(epochs=1, batch_size=8, lr=1e-3)
    weights, first = runner.pretrain(SMALL, upstream, toy_dataset)
    whole = load(weights.read_bytes())  # not load_file: its tensors map the file, cut short below
    trained_at = (weights.parent / "result.json").stat().st_mtime_ns
    weights.write_bytes(weights.read_bytes()[:1000])
    again, second = runner.pretrain(SMALL, upstream, toy_dataset)
    assert again == weights and second == first
    merged = load(again.read_bytes())
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)
    assert (weights.parent / "result.json").stat().st_mtime_ns == trained_at  # merged again, not trained again
    assert f"cached upstream model {weights} cannot be read; merging it again" in caplog.text


def test_a_finished_cell_trained_with_other_settings_is_refused_not_read_back(
    tmp_path: Path, toy_dataset: Path
) -> None:
    """A rerun with --epochs 7 --set lr=0.5 read back cells of 1 epoch and wrote a table claiming 7 (hostile
    tester)."""
    one = Preset("one", "", TOY.base, {"linear": MethodSettings(lr=5e-3)}, ("none",), (0,))
    run = dict(weights=None, pretrained=False, progress=False, one_process=True)
    first = reproduce(one, tmp_path / "out", toy_dataset, **run)
    again = reproduce(one, tmp_path / "out", toy_dataset, **run)  # the same settings: read back
    assert again.cells[0].result == first.cells[0].result
    cell = tmp_path / "out" / "cells" / "linear-none-s0"
    with pytest.raises(ValueError, match=rf"finished cell {cell}: trained with other settings \(epochs, lr\)"):
        reproduce(one, tmp_path / "out", toy_dataset, overrides={"epochs": 3, "lr": 0.5}, **run)


def test_a_key_named_that_is_not_there_is_not_made(tmp_path: Path, toy_dataset: Path) -> None:
    """`--key mykye.key` (a typo) made a new key there, and every cell encrypted with it."""
    with pytest.raises(FileNotFoundError, match=r"key file .*mykye\.key: not found"):
        reproduce(TOY, tmp_path / "out", toy_dataset, key=tmp_path / "mykye.key", progress=False)
    assert not (tmp_path / "mykye.key").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--seeds", "0,0"], "--seeds 0,0: a seed named twice"),
        (["--seeds", "a"], "--seeds: expected comma-separated whole numbers"),
        (["--epochs", "0"], "epochs"),
        (["--minutes", "nan"], "--minutes nan: must be 0 (no budget) or a finite number"),
        (["--minutes", "-1"], "--minutes -1: must be 0 (no budget) or a finite number"),
        (["--schemes", "none,bogus"], "unknown scheme step 'bogus'"),
        (["--key", "{bad_key}"], "bad.key"),
    ],
    ids=["seed twice", "seed not a number", "epochs 0", "minutes nan", "minutes below 0", "bogus scheme", "bad key"],
)
def test_reproduce_flags_that_cannot_be_meant_are_one_line(
    tmp_path: Path, toy_dataset: Path, capsys: pytest.CaptureFixture[str], flags: list[str], says: str
) -> None:
    """A seed twice was one cell counted as two (n=2, spread 0); --epochs 0 was dropped for the preset's; a bogus
    scheme or an unreadable key failed only after the plain cells had trained; --minutes nan was taken."""
    (tmp_path / "bad.key").write_text("not a key")
    flags = [f.format(bad_key=tmp_path / "bad.key") for f in flags]
    argv = ["-q", "reproduce", "--preset", "small-demo", "--data", str(toy_dataset), "--out", str(tmp_path / "o")]
    assert cli.main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "o").exists()


def test_a_second_reproduce_into_a_folder_in_use_is_refused_and_removes_nothing(
    tmp_path: Path, toy_dataset: Path
) -> None:
    """Two runs into one --out: one stopped early deleted reproduce.key, the key the other's cells trained with."""
    from ppvit._io import hold_lock

    out = tmp_path / "out"
    out.mkdir()
    with hold_lock(out / ".lock"):  # as the first run holds it
        with pytest.raises(ValueError, match=rf"output folder {out}: in use by another `ppvit reproduce` \(pid "):
            reproduce(TOY, out, toy_dataset, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no key made, none deleted
        Key.generate().save(out / "reproduce.key")  # the first run's
        with pytest.raises(ValueError, match="in use by another"):
            reproduce(TOY, out, toy_dataset, progress=False)
        assert (out / "reproduce.key").exists()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"train_subset": 11}', None),
        ("{", "cannot be read"),
        ("[11]", "no training subset"),
        ('{"minutes": 2}', "no training subset"),
        ('{"train_subset": "11"}', "no training subset"),
        ('{"train_subset": 0}', "no training subset"),
        ('{"train_subset": true}', "no training subset"),
    ],
)
def test_a_budget_record_edited_by_hand_is_one_line(tmp_path: Path, text: str, says: str | None) -> None:
    """An edited budget.json was a KeyError traceback (hostile tester)."""
    record = tmp_path / "budget.json"
    record.write_text(text)
    if says is None:
        assert budgets.read_budget(record) == {"train_subset": 11}
        return
    with pytest.raises(ValueError, match=rf"budget record {record}: {says}"):
        budgets.read_budget(record)


def test_a_folder_that_cannot_be_locked_is_named_and_not_left_behind(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock's ENOLCK (a network file system) was "No locks available", naming no file, the new folder left."""
    import errno

    from ppvit.train import runs

    def no_locks(path: Path) -> None:
        Path(path).touch()
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs, "hold_lock", no_locks)
    out = tmp_path / "new" / "out"
    with pytest.raises(OSError, match="cannot be locked") as refused:
        reproduce(TOY, out, toy_dataset, progress=False)
    assert refused.value.filename == str(out / ".lock") and not (tmp_path / "new").exists()


def test_a_stop_while_pretraining_says_the_same_reproduce_command_continues(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream model's training said `--resume`, which reproduce has not (second reader)."""
    from ppvit.train.loop import TrainingStopped

    def stopped(*args: object, **kw: object) -> None:
        raise TrainingStopped("stopped by SIGTERM at epoch 1, step 2; ...: continue with ... --resume", 15)

    monkeypatch.setattr(runner, "pretrain", stopped)
    with pytest.raises(TrainingStopped, match="while pretraining the upstream model") as caught:
        reproduce(TOY, tmp_path / "out", toy_dataset, progress=False)
    assert "--resume" not in str(caught.value) and caught.value.signum == 15
