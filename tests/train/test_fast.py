"""The GPU path of a run (train.fast), checked on the CPU with each choice forced on: same numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, adapter_tensors, train_config

from ppvit.data.datasets import ArrayDataset
from ppvit.data.pipeline import DeviceDataset, get_batch
from ppvit.models.backbones import create_backbone
from ppvit.train.fast import StepTotals, log_every, make_optimizer, maybe_compile
from ppvit.train.loop import train


def test_resident_data_and_a_sync_every_few_steps_train_exactly_as_the_plain_loop(
    tmp_path: Path, toy_dataset: Path, key_file: Path
) -> None:
    """What a CUDA run does by default (data on the device, loss read every N steps), forced on a CPU."""
    plain = train(train_config(tmp_path / "plain", toy_dataset, key_file, epochs=2))
    fast = train(train_config(tmp_path / "fast", toy_dataset, key_file, epochs=2, device_data=True, log_every_steps=3))
    assert fast.test_acc == plain.test_acc and fast.test_loss == plain.test_loss
    rows = [json.loads(line) for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    before = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, before, strict=True):
        assert (a["train_loss"], a["train_acc"], a["val_acc"]) == (b["train_loss"], b["train_acc"], b["val_acc"])
    one, two = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "fast")
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_device_dataset_gathers_the_same_batch_as_the_array() -> None:
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8), np.arange(10), ("a",))
    index = torch.tensor([7, 2, 9, 0, 5])
    for rank in (0, 1):
        want = get_batch(ds, index, rank, 2)
        got = get_batch(DeviceDataset.of(ds, torch.device("cpu")), index, rank, 2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1].long())


def test_step_totals_sum_as_the_host_did_and_remember_a_non_finite_loss() -> None:
    totals = StepTotals(torch.device("cpu"), {"loss": 1.0, "correct": 2.0, "n": 3.0})
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    totals.add(torch.tensor(0.5), logits, torch.tensor([1, 1]))
    sums, finite = totals.read()
    assert sums == {"loss": 1.0 + 0.5 * 2, "correct": 2.0 + 1, "n": 5.0} and finite
    totals.add(torch.tensor(math.inf), logits, torch.tensor([1, 1]))
    assert totals.read()[1] is False


def test_cuda_gets_fused_adamw_the_same_update_and_a_sync_every_50_steps() -> None:
    """The fused kernel (CUDA's choice) runs on CPU tensors too: one step equals the unfused one."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (log_every(cuda, None), log_every(cpu, None), log_every(cuda, 7)) == (50, 1, 7)
    results = []
    for device in (cuda, cpu):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        opt = make_optimizer([{"params": [w], "lr": 0.1, "weight_decay": 0.05}], device)
        assert bool(opt.defaults.get("fused")) == (device.type == "cuda")
        (w**2).sum().backward()
        opt.step()
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_compile_is_off_on_cpus_unless_asked_and_compiled_forward_matches() -> None:
    model = create_backbone(SMALL, num_classes=4).eval()
    assert maybe_compile(model, torch.device("cpu"), None) is model
    compiled = maybe_compile(model, torch.device("cpu"), True)
    assert compiled is not model and compiled.state_dict().keys() != model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_run_trains_like_the_eager_one(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    """torch.compile on the CPU (minutes): checkpoints and adapters come from the model, not the compiled wrapper."""
    eager = train(train_config(tmp_path / "eager", toy_dataset, key_file, epochs=1))
    compiled = train(train_config(tmp_path / "compiled", toy_dataset, key_file, epochs=1, compile=True))
    assert abs(compiled.test_loss - eager.test_loss) < 1e-3
    one, two = adapter_tensors(tmp_path / "eager"), adapter_tensors(tmp_path / "compiled")
    assert one.keys() == two.keys()
