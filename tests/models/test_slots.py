"""Slot tables: a mixed pass gathers each sample's adapter rows from tables written once per adapter."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import SMALL
from test_routing import KINDS, routed
from torch.profiler import profile

from ppvit.models.backbones import create_backbone
from ppvit.models.routing import RoutedViT
from ppvit.models.slots import _LoraTable

# adapters by kind (KINDS: lora-pe rank 4 with its patch embedding; melo on every Linear, rank 2; a head only;
# q/v LoRA rank 8 with position embeddings), then a second lora-pe rank 4 and a second head only
ADAPTERS = [0, 1, 2, 3, 0, 2]


def kind(base: torch.nn.Module, k: int, seed: int):
    classes, method, opts = KINDS[k]
    return routed(base, classes, seed, method, **opts)


def alone(net: RoutedViT, adapter, x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` through ``adapter`` by itself (one client's pass: no tables)."""
    return torch.stack(net(x, [adapter], [0] * len(x)))


@pytest.mark.parametrize(
    ("capacity", "passes"),
    [
        (2, [[0, 1], [2, 3], [0, 2], [1, 3], [4, 5]]),  # evictions: a patch-embedding adapter's slot to a head only
        (8, [[0, 4], [0, 3], [0, 1], [3, 4]]),  # q/v rank 4, then rank 8, then LoRA everywhere: the layout widens
        (2, [[0, 1, 2, 3, 4, 5], [5, 0]]),  # more tenants in a pass than slots: the tables grow
        (64, [[2, 5], [5, 2]]),  # no LoRA, no embedding of their own: heads only
    ],
)
def test_every_row_of_every_pass_is_its_own_adapters(capacity: int, passes: list[list[int]]) -> None:
    """Pass after pass, with slots taken over, tables widened or grown, each sample's logits equal its
    adapter's computed alone: no row keeps what an earlier holder of its slot wrote."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    adapters = [kind(base, k, seed) for seed, k in enumerate(ADAPTERS)]
    net = RoutedViT(base, slots=capacity)
    for tenants in passes:
        x = torch.randn(2 * len(tenants), 3, 32, 32)
        index = [i % len(tenants) for i in range(len(x))]
        rows = net(x, [adapters[t] for t in tenants], index)
        for j, i in enumerate(index):
            torch.testing.assert_close(rows[j], alone(net, adapters[tenants[i]], x[j : j + 1])[0], rtol=0, atol=1e-5)
    assert net.slots.rows == max(capacity if capacity < 8 else min(8, capacity), *map(len, passes))


def test_slots_are_bounded_and_hold_no_adapter_alive() -> None:
    """Beyond ``capacity`` the least recently used adapter's slot is overwritten (the tables stay that size),
    and an adapter the server's cache dropped is freed (the tables hold no reference to it), its embeddings
    zeroed by the next mixed pass."""
    base = create_backbone(SMALL)
    net = RoutedViT(base, slots=3)
    x = torch.randn(2, 3, 32, 32)
    adapters = [routed(base, 10, seed) for seed in range(6)]
    for i in range(1, 6):
        net(x, [adapters[0], adapters[i]], [0, 1])
    size = net.slots.nbytes
    assert net.slots.rows == 3 and size > 0
    refs = [weakref.ref(a) for a in adapters[1:]]
    dropped = [a.patch_weight.clone() for a in adapters[1:]]  # lora-pe's own patch embeddings (a key's, with key-init)
    del adapters[1:]
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    net(x, [adapters[0], routed(base, 10, 6)], [0, 1])
    assert net.slots.rows == 3 and net.slots.nbytes == size
    assert not any(torch.equal(row, w) for row in net.slots.patch_weight for w in dropped)  # zeroed, not kept


def test_slots_grow_to_capacity_then_go_to_a_dead_adapter_or_the_least_recently_used() -> None:
    """Below ``capacity`` every adapter keeps its slot (the tables grow); at capacity a newcomer takes a
    dropped adapter's slot before any live one's, else the least recently used one's."""
    base = create_backbone(SMALL)
    x = torch.randn(2, 3, 32, 32)
    net = RoutedViT(base, slots=64)
    heads = [routed(base, 3, seed, "linear") for seed in range(10)]
    for i in range(0, 10, 2):
        net(x, heads[i : i + 2], [0, 1])
    assert net.slots.rows == 16 and all(net.slots.slot_of(h) is not None for h in heads)
    base = create_backbone(SMALL)
    net = RoutedViT(base, slots=3)
    a = [routed(base, 3, seed, "linear") for seed in range(5)]
    net(x, [a[0], a[1]], [0, 1])
    net(x, [a[2], a[0]], [0, 1])
    net(x, [a[3], a[2]], [0, 1])  # a[1], the least recently used, goes
    assert [net.slots.slot_of(h) is not None for h in a[:4]] == [True, False, True, True]
    del a[3]
    gc.collect()
    net(x, [a[2], a[3]], [0, 1])  # a[0] is used less recently than a[3] was, but a[3]'s slot is free
    assert net.slots.slot_of(a[0]) is not None


def test_a_pass_of_held_adapters_stacks_and_writes_nothing() -> None:
    """The second pass of the same tenants gathers from the tables: no stack of adapters' tensors, no row
    written (a row write zeroes it first); the first pass wrote them."""
    base = create_backbone(SMALL)
    adapters = [kind(base, k, k) for k in range(4)]
    net = RoutedViT(base)
    x, index = torch.randn(8, 3, 32, 32), [3, 0, 2, 1, 1, 0, 2, 3]
    ops = []
    for _ in range(2):
        with profile() as prof:
            net(x, adapters, index)
        ops.append({e.name for e in prof.events()})
    assert "aten::zero_" in ops[0]
    assert not {"aten::stack", "aten::zero_", "aten::zeros"} & ops[1]


def test_q_v_lora_of_one_rank_stays_compact_until_another_layout_joins() -> None:
    """Tables of q/v LoRA of one rank r hold B as (2, d, r) (no zero k rows multiplied); a general or
    other-rank adapter widens the table to (3d, R) with R the widest rank, q/v as 2r."""
    base = create_backbone(SMALL)
    net, x = RoutedViT(base), torch.randn(2, 3, 32, 32)
    qv4, qv4b, general = kind(base, 0, 0), kind(base, 0, 1), kind(base, 1, 2)
    net(x, [qv4, qv4b], [0, 1])
    table = net.slots.lora["blocks.0.attn.qkv"]
    d = base.embed_dim
    assert table.layout.qv and tuple(table.b.shape[1:]) == (2, d, 4) and tuple(table.a.shape[1:]) == (8, d)
    net(x, [qv4, general], [0, 1])
    table = net.slots.lora["blocks.0.attn.qkv"]
    assert not table.layout.qv and tuple(table.b.shape[1:]) == (3 * d, 8) and tuple(table.a.shape[1:]) == (8, d)


def test_a_write_that_fails_half_way_leaves_no_slot_to_answer_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's write into a slot taken over fails part way (on a GPU: out of memory): the tables are
    cleared, so no later pass reads the slot's earlier holder's embeddings or factors as the newcomer's."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    a, b, c = kind(base, 0, 0), kind(base, 3, 1), kind(base, 1, 2)
    net, x = RoutedViT(base, slots=2), torch.randn(4, 3, 32, 32)
    net(x, [a, b], [0, 1, 0, 1])
    write = _LoraTable.write

    def fails(self: _LoraTable, slot: int, pair: tuple | None) -> None:
        if pair is not None and pair[0].shape[0] == 2:  # c's rank-2 factors, after b's slot was claimed
            raise RuntimeError("CUDA out of memory")
        write(self, slot, pair)

    monkeypatch.setattr(_LoraTable, "write", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        net(x, [a, c], [0, 1, 0, 1])
    monkeypatch.setattr(_LoraTable, "write", write)
    for tenants in ([c, a], [b, c], [a, b]):
        rows = net(x, tenants, [0, 1, 0, 1])
        for j in range(4):
            torch.testing.assert_close(rows[j], alone(net, tenants[j % 2], x[j : j + 1])[0], rtol=0, atol=1e-5)


def test_a_newcomer_never_takes_the_slot_of_an_adapter_of_its_own_pass() -> None:
    base = create_backbone(SMALL)
    a, b, c = (routed(base, 3, seed, "linear") for seed in range(3))
    net, x = RoutedViT(base, slots=2), torch.randn(2, 3, 32, 32)
    net(x, [a, b], [0, 1])
    slot = net.slots.slot_of(a)
    net(x, [c, a], [0, 1])  # a and b were used alike long ago; a is in this pass: b's slot goes to c
    assert net.slots.slot_of(a) == slot and net.slots.slot_of(b) is None


def test_tables_live_on_the_backbones_device_and_outlast_inference_mode() -> None:
    """Adapters on another device than the backbone are copied to it (the forward moved them before the
    tables); tables made in a pass under ``torch.inference_mode`` are written by later passes outside it."""
    base = create_backbone(SMALL)
    adapters = [kind(base, k, k) for k in range(4)]
    net = RoutedViT(copy.deepcopy(base).to("meta"))
    rows = net(torch.empty(4, 3, 32, 32, device="meta"), adapters, [0, 1, 2, 3])  # adapters on the CPU
    assert [r.device.type for r in rows] == ["meta"] * 4
    net, x = RoutedViT(base), torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        net(x, adapters[:2], [0, 1, 0, 1])
    rows = net(x, adapters[2:], [0, 1, 0, 1])
    for j in range(4):
        torch.testing.assert_close(rows[j], alone(net, adapters[2 + j % 2], x[j : j + 1])[0], rtol=0, atol=1e-5)


def test_the_tables_keep_within_their_bytes_or_one_pass() -> None:
    """A wide adapter (LoRA on every Linear) widens the tables past ``slot_bytes``: the pass that did it keeps
    its own adapters alone, and no later pass leaves more than the bytes, or than its own adapters, held;
    every row is still its adapter's."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    narrow = [kind(base, 0, seed) for seed in range(4)]  # lora-pe, q/v rank 4
    wide = kind(base, 1, 4)  # melo, rank 2 on every Linear
    x = torch.randn(4, 3, 32, 32)
    probe = RoutedViT(copy.deepcopy(base))
    probe(x, narrow[:2], [0, 1, 0, 1])
    budget = 6 * probe.slots.nbytes // probe.slots.rows  # six narrow rows
    net, rows = RoutedViT(base, slot_bytes=budget), []
    for tenants in ([0, 1], [2, 3], [0, 1], [0, 4], [1, 2], [3, 4], [2, 0]):
        adapters = [wide if t == 4 else narrow[t] for t in tenants]
        out = net(x, adapters, [0, 1, 0, 1])
        for j in range(4):
            torch.testing.assert_close(out[j], alone(net, adapters[j % 2], x[j : j + 1])[0], rtol=0, atol=1e-5)
        assert net.slots.nbytes <= budget or net.slots.rows == len(tenants)
        rows.append(net.slots.rows)
    assert rows[1:4] == [6, 6, 2]  # bounded by the bytes (six narrow rows), then the wide pass's two alone


def test_a_wide_newcomer_never_widens_the_rows_it_is_about_to_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the tables full of narrow rows up to the bytes, a wide adapter's pass starts afresh with its own
    adapters (two rows) instead of widening all six held rows first (its peak, on a GPU an out-of-memory)."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    narrow = [kind(base, 0, seed) for seed in range(6)]
    x = torch.randn(2, 3, 32, 32)
    probe = RoutedViT(copy.deepcopy(base))
    probe(x, narrow[:2], [0, 1])
    net = RoutedViT(base, slot_bytes=6 * probe.slots.nbytes // probe.slots.rows)
    for i in range(0, 6, 2):
        net(x, narrow[i : i + 2], [0, 1])
    assert net.slots.rows == 6
    made, empty = [], _LoraTable.empty

    def recording(layout, rows: int, shape, like):
        made.append((layout.qv, rows))
        return empty(layout, rows, shape, like)

    monkeypatch.setattr(_LoraTable, "empty", staticmethod(recording))
    net(x, [narrow[0], kind(base, 1, 6)], [0, 1])
    assert made and all(rows == 2 for _, rows in made)


def test_the_tables_narrow_again_once_the_wide_adapter_has_left() -> None:
    """After a wide adapter's pass, passes of narrow ones take its slot and, when the bytes make them evict,
    start the tables afresh at their own width: q/v compact again, and as many rows as before it."""
    torch.manual_seed(0)
    base = create_backbone(SMALL)
    narrow = [kind(base, 0, seed) for seed in range(4)]
    wide = kind(base, 1, 4)
    x = torch.randn(4, 3, 32, 32)
    probe = RoutedViT(copy.deepcopy(base))
    probe(x, narrow[:2], [0, 1, 0, 1])
    net = RoutedViT(base, slot_bytes=6 * probe.slots.nbytes // probe.slots.rows)
    for tenants in ([0, 1], [2, 3], [0, 4], [1, 2], [3, 0], [1, 2], [3, 0], [1, 2], [3, 0]):
        adapters = [wide if t == 4 else narrow[t] for t in tenants]
        out = net(x, adapters, [0, 1, 0, 1])
        for j in range(4):
            torch.testing.assert_close(out[j], alone(net, adapters[j % 2], x[j : j + 1])[0], rtol=0, atol=1e-5)
    assert net.slots.lora["blocks.0.attn.qkv"].layout.qv and net.slots.rows >= 4
    assert all(net.slots.slot_of(a) is not None for a in narrow)  # all four held: no rewrites in the last passes


def test_a_pass_that_writes_nothing_leaves_the_tables_where_they_are() -> None:
    """At the byte bound, a pass of 4 tenants keeps its own adapters past the bytes (3 rows); passes of 3 of them
    that follow write nothing and leave the tables as they are (they were started afresh each time, their 3
    adapters written again, then grown again by the next pass of 4: a recorded graph's tables moved every pass);
    a newcomer brings the bound back."""
    base = create_backbone(SMALL)
    adapters = [routed(base, 10, seed) for seed in range(5)]
    x = torch.randn(4, 3, 32, 32)
    probe = RoutedViT(copy.deepcopy(base))
    probe(x[:3], adapters[:3], [0, 1, 2])
    row = probe.slots.nbytes // probe.slots.rows
    net = RoutedViT(base, slot_bytes=3 * row)
    net(x, adapters[:4], [0, 1, 2, 3])
    where = net.slots.signature
    for tenants in ([0, 1, 2], [0, 1, 2, 3], [1, 2, 3], [3, 0, 1]):
        out = net(x[: len(tenants)], [adapters[t] for t in tenants], list(range(len(tenants))))
        for j, t in enumerate(tenants):
            torch.testing.assert_close(out[j], alone(net, adapters[t], x[j : j + 1])[0], rtol=0, atol=1e-5)
        assert net.slots.signature == where and net.slots.rows == 4
    net(x[:3], [adapters[4], adapters[0], adapters[1]], [0, 1, 2])  # a newcomer: written, then within the bytes
    assert net.slots.rows == 3 and net.slots.nbytes <= 3 * row


def test_newcomers_taking_every_row_of_wider_tables_start_them_at_their_own_width() -> None:
    """Tables made wide (patch and position embeddings, q/v LoRA) by one pass; a pass of as many newcomers as
    rows, heads only, over the bytes: the tables start afresh at the newcomers' width (they were written into the
    wide rows, which then stayed, over the bytes, while later passes held the same adapters)."""
    base = create_backbone(SMALL)
    wide = [kind(base, 0, 0), kind(base, 3, 1)]  # lora-pe; q/v LoRA with position embeddings
    heads = [kind(base, 2, seed) for seed in (2, 3)]  # heads only: no row width at all
    net = RoutedViT(base, slot_bytes=1)
    x = torch.randn(2, 3, 32, 32)
    net(x, wide, [0, 1])
    assert net.slots.rows == 2 and net.slots.nbytes > 0
    for _ in range(2):
        out = net(x, heads, [0, 1])
        for j in range(2):
            torch.testing.assert_close(out[j], alone(net, heads[j], x[j : j + 1])[0], rtol=0, atol=1e-5)
        assert net.slots.nbytes == 0
