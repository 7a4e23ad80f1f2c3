"""Recorded routed passes (``RoutedViT(capture=...)``), checked on a CPU with a recorder that keeps a CUDA graph's
contract: the tensors a pass read are fixed at capture (``make_fx`` holds them, not copies: a table replaced later
is not seen, one written in place is), and each replay overwrites one output buffer."""

from __future__ import annotations

import copy
import gc
import logging
import random
from collections.abc import Callable

import pytest
import torch
from conftest import SMALL, recorder
from test_routing import routed
from test_slots import ADAPTERS, alone, kind

from ppvit.models import graphs
from ppvit.models.backbones import create_backbone
from ppvit.models.graphs import Replay, bucket, cuda_graph
from ppvit.models.routing import RoutedViT


def nets(base: torch.nn.Module, **kwargs: object) -> tuple[RoutedViT, RoutedViT]:
    """A recording routed model and an eager one on a copy of the backbone (the reference)."""
    eager = RoutedViT(copy.deepcopy(base))
    return RoutedViT(base, capture=recorder, **kwargs), eager


def check(nets: tuple[RoutedViT, RoutedViT], adapters: list, x: torch.Tensor, index: list[int]) -> list[torch.Tensor]:
    """The pass's logits, each checked against its adapter alone through the eager model."""
    net, eager = nets
    rows = net(x, adapters, index)
    for j, i in enumerate(index):
        torch.testing.assert_close(rows[j], alone(eager, adapters[i], x[j : j + 1])[0], rtol=0, atol=1e-5)
    return rows


@pytest.mark.parametrize(
    ("capacity", "passes", "captures"),
    [
        # one tenant; new kinds add tables (recorded again); another mix in the same bucket; a new bucket
        (8, [([0], 3), ([0, 1, 2, 3], 4), ([3, 2, 1, 0], 3), ([1], 1)], 3),
        # lora-pe and heads only, newcomers evicting (capacity 2), written in place: one graph throughout
        (2, [([0, 2], 2), ([4, 5], 2), ([0, 5], 2), ([2, 4], 2)], 1),
        # more tenants than rows: the tables grow (a new signature), the bucket is recorded again
        (2, [([0, 1], 4), ([0, 1, 2, 3, 4, 5], 4)], 2),
        # a layout widens (q/v rank 4, then LoRA everywhere): recorded again
        (8, [([0, 4], 4), ([0, 1], 4)], 2),
    ],
)
def test_replayed_passes_are_each_samples_own_adapter(
    capacity: int, passes: list[tuple[list[int], int]], captures: int
) -> None:
    """Replays of the recorded passes, with padding, evictions, growth and widening: each sample's logits are its
    adapter's computed alone, and a graph is recorded only where the bucket or the tables' place changed (each pass
    twice: a bucket is recorded at the second pass in a row that finds the same tables)."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    adapters = [kind(base, k, seed) for seed, k in enumerate(ADAPTERS)]
    net, eager = nets(base, slots=capacity)
    for tenants, size in passes:
        for _ in range(2):
            x = torch.randn(size, 3, 32, 32)
            check((net, eager), [adapters[t] for t in tenants], x, [i % len(tenants) for i in range(size)])
    assert net.graphs is not None and net.graphs.failed is None
    assert net.graphs.captures == captures


def test_a_replays_output_is_the_callers_after_the_next_replay() -> None:
    """The graph's output buffer is overwritten by the next replay; the logits a pass returned are not."""
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    net = RoutedViT(base, capture=recorder)
    net(torch.randn(2, 3, 32, 32), adapters, [0, 1])
    first = net(torch.randn(2, 3, 32, 32), adapters, [0, 1])  # recorded, replayed
    kept = [row.clone() for row in first]
    net(torch.randn(2, 3, 32, 32), adapters, [1, 0])
    assert all(torch.equal(a, b) for a, b in zip(first, kept, strict=True))


def test_a_dropped_adapters_row_taken_by_a_newcomer_is_replayed_with_the_newcomers_values() -> None:
    """The cache drops an adapter; a newcomer takes its slot (written in place): the same graph, the new rows."""
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(3)]
    net, eager = nets(base, slots=2)
    x = torch.randn(2, 3, 32, 32)
    check((net, eager), adapters[:2], x, [0, 1])
    check((net, eager), adapters[:2], x, [1, 0])  # recorded
    del adapters[1]
    gc.collect()
    check((net, eager), adapters, x, [1, 0])
    assert net.graphs is not None and net.graphs.captures == 1


def test_a_failed_capture_serves_eagerly_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    def refuses(fn: Callable[[], torch.Tensor]) -> Replay:
        raise RuntimeError("operation not permitted when stream is capturing")

    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    eager = RoutedViT(copy.deepcopy(base))
    net = RoutedViT(base, capture=refuses)
    with caplog.at_level(logging.WARNING, logger="ppvit.models.graphs"):
        for _ in range(3):  # eager, a failed recording, eager
            check((net, eager), adapters, torch.randn(3, 3, 32, 32), [1, 0, 1])
    assert net.graphs is not None and net.graphs.failed is not None and "not permitted" in net.graphs.failed
    assert sum("run eagerly" in r.message for r in caplog.records) == 1


def test_batches_beyond_the_largest_bucket_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphs, "MAX_BUCKET", 2)
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    net, eager = nets(base)
    for _ in range(2):
        check((net, eager), adapters, torch.randn(3, 3, 32, 32), [0, 1, 0])
    assert net.graphs is not None and net.graphs.captures == 0
    for _ in range(2):
        check((net, eager), adapters, torch.randn(2, 3, 32, 32), [1, 0])
    assert net.graphs.captures == 1


@pytest.mark.parametrize(("batch", "size"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (64, 64), (65, 128)])
def test_a_batch_is_padded_to_the_next_power_of_two(batch: int, size: int) -> None:
    assert bucket(batch) == size


def test_a_pass_under_autocast_is_recorded_apart() -> None:
    """The recorded kernels follow the autocast state at capture: another state is another graph."""
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    net = RoutedViT(base, capture=recorder)
    x = torch.randn(2, 3, 32, 32)
    exact = [net(x, adapters, [0, 1]) for _ in range(2)][1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [net(x, adapters, [0, 1]) for _ in range(2)][1]
    assert net.graphs is not None and net.graphs.captures == 2
    assert low[0].dtype == torch.bfloat16 and exact[0].dtype == torch.float32
    torch.testing.assert_close(low[0].float(), exact[0], rtol=0.1, atol=0.1)


def test_tables_that_change_every_pass_run_eagerly_without_recording_each_time() -> None:
    """A wide tenant alone and two narrow ones alternating at the byte bound start the tables afresh each pass:
    no bucket sees the same tables twice in a row, so nothing is recorded (a recording costs a few passes)."""
    base = create_backbone(SMALL)
    n1, n2 = (routed(base, 10, seed, "lora-pe", rank=2, targets="qkv") for seed in (1, 2))
    wide = routed(base, 10, 3, "melo", rank=8, alpha=4.0, targets="all")
    probe = RoutedViT(copy.deepcopy(base))
    probe(torch.randn(2, 3, 32, 32), [n1, n2], [0, 1])
    net, eager = nets(base, slots=8, slot_bytes=probe.slots.nbytes)  # the two narrow rows exactly
    for _ in range(4):
        check((net, eager), [n1, n2], torch.randn(2, 3, 32, 32), [0, 1])
        check((net, eager), [wide], torch.randn(2, 3, 32, 32), [0, 0])
    assert net.graphs is not None and net.graphs.captures == 0


def test_passes_in_and_out_of_inference_mode_share_a_recording() -> None:
    """The recorded pass's input buffers are ordinary tensors: a pass outside inference mode can write those
    that one inside made."""
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    net, eager = nets(base)
    for mode in (True, True, False, True):
        with torch.inference_mode(mode):
            check((net, eager), adapters, torch.randn(2, 3, 32, 32), [0, 1])
    assert net.graphs is not None and net.graphs.captures == 1


# -- on a GPU (skipped without one; gpu_check.sh runs them): the real capture, on the last CUDA device (cuda:1 or
# later where there are several: a graph captured with the caller's device 0 current once recorded nothing)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def last_cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.device_count() - 1)


@cuda
@pytest.mark.parametrize("seed", range(3))
def test_cuda_graph_replays_are_each_samples_own_adapter(seed: int) -> None:
    """Random passes (adapter kinds, drops, batch sizes 1-33, tight slots and bytes) replayed as CUDA graphs: each
    sample's logits are its adapter's alone, computed eagerly."""
    rng, device = random.Random(seed), last_cuda()
    torch.manual_seed(seed)
    base = create_backbone(SMALL)
    eager = RoutedViT(copy.deepcopy(base).to(device))
    capacity, budget = rng.choice([(2, 256 << 20), (4, 60_000), (64, 256 << 20)])
    net = RoutedViT(base.to(device), slots=capacity, slot_bytes=budget, capture=cuda_graph(device))
    pool, made = [], 0
    for _ in range(16):
        while len(pool) < 5:
            made += 1
            pool.append(kind(base, rng.randrange(4), 100 * seed + made).to(device))
        if rng.random() < 0.2:
            del pool[rng.randrange(len(pool))]
            gc.collect()
        adapters = rng.sample(pool, rng.randint(1, 3))
        for size in [rng.choice([1, 3, 8, 33])] * 2:  # twice: the second records where the first was new
            x = torch.randn(size, 3, 32, 32, device=device)
            index = [rng.randrange(len(adapters)) for _ in range(size)]
            rows = net(x, adapters, index)
            for j, i in enumerate(index):
                alone_ = eager(x[j : j + 1], [adapters[i]], [0])[0]
                torch.testing.assert_close(rows[j], alone_, rtol=0, atol=1e-4)
    assert net.graphs is not None and net.graphs.failed is None and net.graphs.captures > 0


@cuda
def test_a_failed_cuda_capture_leaves_the_stream_as_it_was_and_names_its_cause() -> None:
    device = last_cuda()
    base = create_backbone(SMALL).to(device)
    adapters = [routed(base, 10, seed).to(device) for seed in range(2)]
    net = RoutedViT(base, capture=cuda_graph(device))
    gathered = net._gathered
    net._gathered = lambda x, at, ads: (x.sum().item(), gathered(x, at, ads))[1]  # a sync: not capturable
    before = torch.cuda.current_stream(device)
    for _ in range(3):
        net(torch.randn(2, 3, 32, 32, device=device), adapters, [0, 1])
    assert net.graphs is not None and net.graphs.failed is not None
    assert "previous error" not in net.graphs.failed, net.graphs.failed
    assert torch.cuda.current_stream(device) == before
