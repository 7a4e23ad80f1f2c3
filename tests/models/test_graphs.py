"""Recorded routed passes (``RoutedViT(capture=...)``), checked on a CPU with a recorder that keeps a CUDA graph's
contract: the tensors a pass read are fixed at capture (``make_fx`` holds them, not copies: a table replaced later
is not seen, one written in place is), and each replay overwrites one output buffer."""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable

import pytest
import torch
from conftest import SMALL, recorder
from test_routing import routed
from test_slots import ADAPTERS, alone, kind

from ppvit.models import graphs
from ppvit.models.backbones import create_backbone
from ppvit.models.graphs import Replay, bucket
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
    adapter's computed alone, and a graph is recorded only where the bucket or the tables' place changed."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    adapters = [kind(base, k, seed) for seed, k in enumerate(ADAPTERS)]
    net, eager = nets(base, slots=capacity)
    for tenants, size in passes:
        x = torch.randn(size, 3, 32, 32)
        check((net, eager), [adapters[t] for t in tenants], x, [i % len(tenants) for i in range(size)])
    assert net.graphs is not None and net.graphs.failed is None
    assert net.graphs.captures == captures


def test_a_replays_output_is_the_callers_after_the_next_replay() -> None:
    """The graph's output buffer is overwritten by the next replay; the logits a pass returned are not."""
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    net = RoutedViT(base, capture=recorder)
    first = net(torch.randn(2, 3, 32, 32), adapters, [0, 1])
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
        check((net, eager), adapters, torch.randn(3, 3, 32, 32), [0, 1, 1])
        check((net, eager), adapters, torch.randn(3, 3, 32, 32), [1, 0, 1])
    assert net.graphs is not None and net.graphs.failed is not None and "not permitted" in net.graphs.failed
    assert sum("run eagerly" in r.message for r in caplog.records) == 1


def test_batches_beyond_the_largest_bucket_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphs, "MAX_BUCKET", 2)
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(2)]
    net, eager = nets(base)
    check((net, eager), adapters, torch.randn(3, 3, 32, 32), [0, 1, 0])
    assert net.graphs is not None and net.graphs.captures == 0
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
    exact = net(x, adapters, [0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, adapters, [0, 1])
    assert net.graphs is not None and net.graphs.captures == 2
    assert low[0].dtype == torch.bfloat16 and exact[0].dtype == torch.float32
    torch.testing.assert_close(low[0].float(), exact[0], rtol=0.1, atol=0.1)
