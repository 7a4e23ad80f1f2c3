"""Several processes: each global batch is split into one share per process, nothing lost or counted twice.

The real runs use two CPU processes (gloo) of the venv's own interpreter; the share arithmetic
(``get_batch``) and evaluation's sum over processes are also checked in-process, fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapter_tensors, assert_no_key_material, free_port, train_config, train_flags

from ppvit.crypto.keys import Key
from ppvit.data.datasets import ArrayDataset
from ppvit.data.pipeline import BatchPipeline, get_batch
from ppvit.train.inference import evaluate, evaluate_adapter
from ppvit.train.loop import train
from ppvit.train.runs import RunResult

TEST_IMAGES = 33  # with batches of 8: four full batches and a last one of a single image


def numbered(n: int, classes: int = 3) -> ArrayDataset:
    """Image i is filled with the value i, so that a batch shows which images it holds."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()
    return ArrayDataset(images, np.arange(n) % classes, tuple(f"c{c}" for c in range(classes)))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("size", [1, 5, 8])
def test_get_batch_shares_partition_the_batch_in_order(world: int, size: int) -> None:
    ds = numbered(20)
    index = torch.randperm(20, generator=torch.Generator().manual_seed(size))[:size]
    shares = [get_batch(ds, index, rank, world) for rank in range(world)]
    assert [len(labels) for _, labels in shares] == [size // world + (r < size % world) for r in range(world)]
    assert torch.cat([images[:, 0, 0, 0] for images, _ in shares]).tolist() == index.tolist()  # in order, once
    for images, labels in shares:  # an empty share is still a batch of the right shape
        assert images.shape[1:] == (4, 4, 3) and images.dtype == torch.uint8
        assert labels.tolist() == (images[:, 0, 0, 0].long() % 3).tolist()


class RankOf:
    """What ``evaluate`` needs of an Accelerator, for one rank of a simulated world; ``reduce`` keeps this rank's."""

    device = torch.device("cpu")

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes = rank, world

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shares_add_up_to_one_pass_over_an_odd_set(world: int) -> None:
    ds = numbered(TEST_IMAGES)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 3, 3))
    pipeline = BatchPipeline(4, (0.5,) * 3, (0.5,) * 3)
    whole = evaluate(model, ds, pipeline, 8, RankOf(0, 1))
    parts = [evaluate(model, ds, pipeline, 8, RankOf(r, world)) for r in range(world)]  # per rank, before the sum
    assert whole["n"] == TEST_IMAGES and sum(p["n"] for p in parts) == TEST_IMAGES
    assert sum(p["acc"] * p["n"] for p in parts) == pytest.approx(whole["acc"] * TEST_IMAGES)
    assert sum(p["loss"] * p["n"] for p in parts) == pytest.approx(whole["loss"] * TEST_IMAGES)


# -- two real processes --------------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def odd_dataset(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy dataset with a 33rd test image."""
    root = tmp_path_factory.mktemp("odd") / "data"
    shutil.copytree(toy_dataset, root)
    shutil.copy(root / "train" / "class0" / "0.png", root / "test" / "class0" / "extra.png")
    assert len(list((root / "test").rglob("*.png"))) == TEST_IMAGES
    return root


@pytest.fixture(scope="module")
def runs(odd_dataset: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process with batch 8, and torchrun with 2 processes (gloo) of 4 each: same data, same settings."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache fixture has not run yet
        mp.setenv("PPVIT_CACHE", str(out / "cache"))
        single = train(train_config(out / "one", odd_dataset, key_file, epochs=2))
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        launch = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
        flags = train_flags(train_config(out / "two", odd_dataset, key_file, epochs=2))
        cmd = [*launch, "-m", "ppvit.cli", "-q", "train", *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=worker_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "single": single, "done": done}


def test_two_processes_match_one_with_the_same_global_batch(runs: dict, key_file: Path) -> None:
    """torchrun with 2 CPU processes (gloo), batch 4 each, against 1 process with batch 8."""
    out, single = runs["out"], runs["single"]
    double = RunResult.read(out / "two" / "result.json")
    assert double.processes == 2 and single.processes == 1
    assert double.test_acc == pytest.approx(single.test_acc, abs=1 / TEST_IMAGES)
    one, two = adapter_tensors(out / "one"), adapter_tensors(out / "two")
    assert one.keys() == two.keys()
    a, b = (torch.cat([t[name].flatten().float() for name in sorted(one)]) for t in (one, two))
    # The all-reduce sums the two shares' gradients in another order than one batch does, and Adam
    # turns a rounding difference in a near-zero gradient into up to lr per step in that element
    # (seen: 1 of 384 elements of a tensor 3e-4 apart). A lost or doubled share moves nearly all.
    off = (b - a).abs() > 1e-4 + 1e-3 * a.abs()
    assert off.float().mean() <= 0.01, f"{int(off.sum())} of {off.numel()} elements differ"
    assert (b - a).abs().max() <= 10 * 3e-3  # a few Adam steps of lr 3e-3 at most, where they differ
    assert_no_key_material([out / "one", out / "two", runs["done"].stdout, runs["done"].stderr], Key.load(key_file))


def test_an_odd_test_set_is_evaluated_once_across_two_processes(runs: dict, odd_dataset: Path, key_file: Path) -> None:
    """33 test images in batches of 8: the last batch of one image is rank 0's alone; rank 1's share is empty."""
    out, single = runs["out"], runs["single"]
    double = json.loads((out / "two" / "result.json").read_text())
    assert double["test_images"] == single.test_images == TEST_IMAGES
    # the same adapter evaluated by one process over the same 33 images gives the same numbers
    alone = evaluate_adapter(out / "two" / "adapter", odd_dataset, Key.load(key_file), batch_size=8)
    assert alone["n"] == TEST_IMAGES
    assert double["test_acc"] == alone["acc"]
    assert double["test_loss"] == pytest.approx(alone["loss"], rel=1e-6)


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    """Batch 7 over 2 processes: each exits 2 with the one-line error, and the run folder is not marked.

    The two workers are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), but
    directly, so that each one's exit code and stderr can be read (torchrun exits 1 and stops the other).
    """
    cfg = train_config(tmp_path / "run", toy_dataset, key_file, batch_size=7, epochs=1)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ppvit.cli", "-q", "train", *train_flags(cfg)],
            env={
                **worker_env(),
                **dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"),
                **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    message = "ppvit train: error: batch size 7 does not divide into 2 equal per-process shares"
    for stdout, stderr, code in results:
        assert code == 2, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == message and "Traceback" not in stderr, stderr[-3000:]
        assert_no_key_material([stdout, stderr], Key.load(key_file))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_finished_train_process_ends_its_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A torchrun rank that left its gloo group to the interpreter's exit aborted ("terminate called without an
    active exception", SIGABRT) after its run had finished, and torchrun reported the run failed (seen once under
    load in `make test`). `ppvit train` destroys the group once the run is done."""
    import torch.distributed as dist

    from ppvit import cli
    from ppvit.train import loop

    done = RunResult(0.5, 1.0, 4, 1, 0.5, 1, "linear", "plain", 2, 10, 1.0, 4.0, 100.0, 1, "no")
    monkeypatch.setattr(loop, "train", lambda cfg, resume=False: done)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert cli.main(["-q", "train", "--out", str(tmp_path / "run"), "--scheme", "none"]) == 0
        assert json.loads(capsys.readouterr().out)["test_acc"] == 0.5
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
