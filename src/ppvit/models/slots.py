"""Resident adapters' routed tensors in per-layer tables, one row (a slot) per adapter, for passes that mix tenants.

A pass that mixes tenants needs every sample's LoRA factors, patch and position embeddings side by side.
Stacking each tenant's tensors afresh every pass cost the host a Python list and a ``stack`` per table per pass
(on 2 vCPUs, 0.45-0.83 ms of a 7-9 ms pass of ViT-Ti's 12 blocks at width 8 with 16-64 tenants), and on a GPU
a launch each. Here an adapter is written into a slot once, by the first pass it is in; a pass then gathers its
samples' rows with one ``index_select`` a table (S-LoRA's unified adapter memory, without its paging).

Once ``capacity`` slots are held, or ``max_bytes`` of tables, a newcomer takes the least recently used adapter's
slot (never one of its own pass's); a pass with more tenants than that grows the tables to its tenants, and a pass
that would leave the tables over ``max_bytes`` (a wide adapter widening one), or that must evict while the tables
are wider than their adapters need (a wide one has left), starts them afresh with its own adapters, at their
widths: the tables hold at most ``max_bytes`` or one pass's adapters. A pass that writes nothing (its adapters all
held) leaves them as they are, over the bytes or not: a pass of K held tenants after one of K+1 at the bytes' edge
started them afresh each time (a recorded graph's tables moved every pass). A table's layout follows what was written to
it: q/v LoRA of one rank ``r`` stays compact (``A`` (S, 2r, in), ``B`` (S, 2, d, r)); anything else widens it
to the general layout (``A`` (S, R, in), ``B`` (S, out, R), ranks zero-padded), and the adapters it holds are
written again (a layout only widens, so that happens a few times at most). An adapter without LoRA in a layer
has zero rows there; without its own patch or position embeddings, the backbone's.

The tables are written only by the forward (one thread, see :class:`~ppvit.models.routing.RoutedViT`); on a GPU
the writes queue on the stream of the passes that read the slots, so no pass reads a slot rewritten after it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.nn as nn

from ppvit.models.methods import qv_stacked


class RoutedAdapter(Protocol):
    """What the tables read of an adapter (:class:`ppvit.models.routing.RoutedAdapter`, which imports this
    module: named here by its shape, not imported back)."""

    @property
    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def patch_weight(self) -> torch.Tensor | None: ...

    @property
    def patch_bias(self) -> torch.Tensor | None: ...

    @property
    def pos_embed(self) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class SampleIndex:
    """Which row each sample of a pass uses, held on the host, where routing decides, and on the device,
    where it gathers. No decision of a forward reads the device: on a GPU, each ``bool()`` of a device tensor
    (one a layer, to see whether a gather was needed) and each list index copied to it (one a head) made the
    host wait for every kernel queued before, so the host's Python and the GPU's work ran one after the other."""

    host: tuple[int, ...]
    on: torch.device
    buffer: torch.Tensor | None = None  # a captured pass's index: rewritten before each replay, always gathered

    @classmethod
    def of(cls, index: torch.Tensor | Sequence[int], device: torch.device) -> SampleIndex:
        """From the host's index (a device tensor works too, at the cost of one wait for it)."""
        return cls(tuple(index.tolist() if isinstance(index, torch.Tensor) else index), device)

    @classmethod
    def static(cls, buffer: torch.Tensor) -> SampleIndex:
        """The index of a recorded pass (:mod:`ppvit.models.graphs`): a device buffer whose values change between
        replays, so nothing may be decided from them; every table is gathered through it."""
        return cls((), buffer.device, buffer)

    @cached_property
    def device(self) -> torch.Tensor:
        """The index on the device, copied once and only by a pass that gathers (one tenant's or distinct
        tenants' in order do not); non_blocking: the host's copy is staged at once, the device not waited for."""
        if self.buffer is not None:
            return self.buffer
        return torch.tensor(self.host, dtype=torch.long).to(self.on, non_blocking=True)

    @property
    def identity(self) -> bool:
        """Sample i uses entry i (a batch of distinct tenants, in order)."""
        return self.buffer is None and self.host == tuple(range(len(self.host)))


def per_sample(table: torch.Tensor, index: SampleIndex | torch.Tensor) -> torch.Tensor:
    """``table[index]`` (one row per sample) without a copy where none is needed: the table
    itself when sample i uses entry i, a view for one entry."""
    if not isinstance(index, SampleIndex):
        index = SampleIndex.of(index, table.device)
    if index.buffer is not None:
        return table.index_select(0, index.buffer)
    if len(table) == 1:
        return table.expand(len(index.host), *table.shape[1:])
    if len(table) == len(index.host) and index.identity:
        return table
    return table.index_select(0, index.device)


@dataclass(frozen=True)
class _Layout:
    """A LoRA table's layout: q/v of rank ``rank`` (compact) or general of rank ``rank``."""

    qv: bool
    rank: int

    @classmethod
    def of(cls, pair: tuple[torch.Tensor, torch.Tensor]) -> _Layout:
        a, b = pair
        return cls(True, b.shape[2]) if b.ndim == 3 else cls(False, a.shape[0])

    def widened(self, other: _Layout) -> _Layout:
        """The layout that holds both (q/v of rank r is general of rank 2r)."""
        return self if self == other else _Layout(False, max(o.rank * (2 if o.qv else 1) for o in (self, other)))

    def numel(self, shape: tuple[int, int]) -> int:
        """Values of a row of A and B for a Linear of ``shape`` (out, in)."""
        out, inp = shape
        return 2 * self.rank * (inp + out // 3) if self.qv else self.rank * (inp + out)


def _shape(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    """(out, in) of the Linear a LoRA pair adapts."""
    a, b = pair
    return (3 * b.shape[1] if b.ndim == 3 else b.shape[0]), a.shape[1]


@dataclass
class _LoraTable:
    layout: _Layout
    a: torch.Tensor  # (S, 2r, in) or (S, R, in)
    b: torch.Tensor  # (S, 2, d, r) or (S, out, R)

    @classmethod
    def empty(cls, layout: _Layout, rows: int, shape: tuple[int, int], like: torch.Tensor) -> _LoraTable:
        """Zero rows for a Linear of ``shape`` (out, in), of ``like``'s dtype and device (the backbone's)."""
        out, inp = shape
        if layout.qv:
            r = layout.rank
            return cls(layout, like.new_zeros(rows, 2 * r, inp), like.new_zeros(rows, 2, out // 3, r))
        return cls(layout, like.new_zeros(rows, layout.rank, inp), like.new_zeros(rows, out, layout.rank))

    def write(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.b[slot].zero_()  # (A's rows beyond the adapter's rank meet these zeros: left as they are)
        if pair is None:
            return
        a, b = pair
        if self.layout.qv:
            self.a[slot].copy_(a)
            self.b[slot].copy_(b)
            return
        b = qv_stacked(b) if b.ndim == 3 else b
        self.a[slot, : a.shape[0]].copy_(a)
        self.b[slot, :, : b.shape[1]].copy_(b)

    def gather(self, at: SampleIndex) -> tuple[torch.Tensor, ...]:
        """Each sample's ``(A, B)``, or ``(A, B_q, B_v)`` for the compact q/v layout."""
        a, b = per_sample(self.a, at), per_sample(self.b, at)
        return (a, *b.unbind(1)) if self.layout.qv else (a, b)


class SlotTables:
    """The tables of one backbone's resident adapters (module docstring); ``capacity`` slots before eviction."""

    def __init__(self, capacity: int = 64, max_bytes: int = 256 << 20) -> None:
        if capacity < 1 or max_bytes < 0:
            raise ValueError(f"slot tables: capacity {capacity} (at least 1), max_bytes {max_bytes} (at least 0)")
        self.capacity, self.max_bytes = capacity, max_bytes
        self._reset(None)

    def _reset(self, device: torch.device | None) -> None:
        self.device = device
        self._held: list[weakref.ref[RoutedAdapter] | None] = []  # per slot: its adapter (not kept alive)
        self._ids: list[int | None] = []  # per slot: id() of its adapter
        self._used: list[int] = []  # per slot: the pass that last used it
        self._slot_of: dict[int, int] = {}  # id(adapter) -> slot, checked against _held (ids are reused)
        self._passes = 0
        self.lora: dict[str, _LoraTable] = {}
        self._shapes: dict[str, tuple[int, int]] = {}  # path -> (out, in)
        self.patch_weight: torch.Tensor | None = None  # (S, D, C p p)
        self.patch_bias: torch.Tensor | None = None  # (S, D)
        self.pos_embed: torch.Tensor | None = None  # (S, tokens, D)

    @property
    def rows(self) -> int:
        return len(self._held)

    @property
    def nbytes(self) -> int:
        tables = [self.patch_weight, self.patch_bias, self.pos_embed]
        tables += [t for table in list(self.lora.values()) for t in (table.a, table.b)]  # list(): one step, while
        # the forward thread may add a table (/metrics reads this from the event loop)
        return sum(t.numel() * t.element_size() for t in tables if t is not None)

    def place(self, adapters: Sequence[RoutedAdapter], base: nn.Module) -> list[int]:
        """The slot of each of a pass's adapters, writing those not held (``base``: the backbone, whose
        embeddings fill the rows of adapters without their own)."""
        device = base.pos_embed.device
        if device != self.device:  # the backbone moved: the tables go with it, written afresh
            self._reset(device)
        self._passes += 1
        held = [self.slot_of(a) for a in adapters]
        for slot in held:  # first: no newcomer of this pass takes a slot this pass reads
            if slot is not None:
                self._used[slot] = self._passes
        try:
            with torch.inference_mode(False):  # tables a later pass outside inference mode can still write
                self._forget_dropped()
                if self._afresh([a for a, slot in zip(adapters, held, strict=True) if slot is None], adapters, base):
                    held = self._restart(len(adapters), base)
                wrote = None in held
                self._place_new(adapters, held, base)
                if (
                    wrote
                    and self.nbytes > self.max_bytes
                    and (
                        self.rows > len(adapters) or self._row_bytes > self._row_bytes_with(adapters, base, fresh=True)
                    )
                ):
                    # over the bytes (a wide adapter widened a table, rows grew, or narrow newcomers took every row
                    # of wide tables): this pass's adapters alone, at their own widths (the others are written
                    # again by their next mixed pass)
                    held = self._restart(len(adapters), base)
                    self._place_new(adapters, held, base)
        except BaseException:  # (out of device memory mid-write): no half-written slot may answer later
            self._reset(device)
            raise
        return [slot for slot in held if slot is not None]

    def _restart(self, rows: int, base: nn.Module) -> list[int | None]:
        """Empty tables of ``rows`` rows, for one pass's adapters alone (none of them held)."""
        self._reset(self.device)
        self._grow(rows, base)
        return [None] * rows

    @property
    def _row_bytes(self) -> int:
        """Bytes of one row (every row is as wide as the widest adapter's; 0 before any row)."""
        return self.nbytes // self.rows if self.rows else 0

    def _afresh(self, new: list[RoutedAdapter], adapters: Sequence[RoutedAdapter], base: nn.Module) -> bool:
        """Whether this pass should start the tables afresh with its own adapters: a newcomer would widen every
        held row past the bytes (widen first, drop after: the pass's peak), or the bytes make a newcomer evict
        while the tables are wider than the adapters they hold need (a wide adapter has left them)."""
        if not new or self.rows < len(adapters):
            return False
        if self.rows > len(adapters) and self.rows * self._row_bytes_with(new, base) > self.max_bytes:
            return True
        row = self._row_bytes
        if self.rows >= self.capacity or (self.rows + 1) * row <= self.max_bytes:
            return False  # room for a row, or the count of slots (not their width) makes it evict
        live = [a for ref in self._held if ref is not None and (a := ref()) is not None]
        return self._row_bytes_with([*live, *new], base, fresh=True) < row

    def _row_bytes_with(self, adapters: Sequence[RoutedAdapter], base: nn.Module, fresh: bool = False) -> int:
        """Bytes of a row once ``adapters`` are written: their LoRA layouts joined to the tables' (``fresh``:
        to none, the width those adapters alone need)."""
        layouts = {} if fresh else {path: table.layout for path, table in self.lora.items()}
        shapes = dict(self._shapes)
        for adapter in adapters:
            for path, pair in adapter.lora.items():
                need = _Layout.of(pair)
                layouts[path] = layouts[path].widened(need) if path in layouts else need
                shapes.setdefault(path, _shape(pair))
        numel = sum(layout.numel(shapes[path]) for path, layout in layouts.items())
        weight = base.patch_embed.proj.weight
        if (self.patch_weight is not None and not fresh) or any(a.patch_weight is not None for a in adapters):
            numel += weight.numel() + weight.shape[0]
        if (self.pos_embed is not None and not fresh) or any(a.pos_embed is not None for a in adapters):
            numel += base.pos_embed[0].numel()
        return numel * base.pos_embed.element_size()

    def _place_new(self, adapters: Sequence[RoutedAdapter], held: list[int | None], base: nn.Module) -> None:
        """Write the adapters without a slot (``held[i]`` None) into free or freed ones."""
        for i, adapter in enumerate(adapters):
            if held[i] is None:
                held[i] = slot = self._free_slot(base, held.count(None))
                self._write(slot, adapter, base)
                self._used[slot] = self._passes

    def _forget_dropped(self) -> None:
        """Free the slots of adapters the cache dropped, and zero their own embeddings (a key holder's are
        derived from the key): held no longer than the next mixed pass, not until the slot is reused."""
        for slot, ref in enumerate(self._held):
            if ref is not None and ref() is None:
                self._held[slot] = None
                self._slot_of.pop(self._ids[slot], None)
                for table in (self.patch_weight, self.patch_bias, self.pos_embed):
                    if table is not None:
                        table[slot].zero_()

    def slot_of(self, adapter: RoutedAdapter) -> int | None:
        """The adapter's slot while the tables hold it."""
        slot = self._slot_of.get(id(adapter))
        ref = None if slot is None else self._held[slot]
        return slot if ref is not None and ref() is adapter else None

    def _free_slot(self, base: nn.Module, wanted: int) -> int:
        """An empty slot, a dead adapter's, a new row (below capacity, or when every slot is this pass's),
        or else the least recently used adapter's."""
        for slot, ref in enumerate(self._held):
            if ref is None or ref() is None:  # free (or dropped during this pass)
                return slot
        others = [s for s in range(self.rows) if self._used[s] != self._passes]
        row = self._row_bytes
        if others and (self.rows >= self.capacity or (self.rows + 1) * row > self.max_bytes):
            return min(others, key=self._used.__getitem__)
        first = self.rows
        must = first + (1 if others else wanted)  # every slot is this pass's: room for its newcomers at once
        rows = min(max(2 * first, 8), self.capacity) if first < self.capacity else must
        self._grow(max(must, min(rows, self.max_bytes // row) if row else rows), base)
        return first

    def _grow(self, rows: int, base: nn.Module) -> None:
        extra = rows - self.rows
        self._held += [None] * extra
        self._ids += [None] * extra
        self._used += [0] * extra

        def more(table: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
            new = table.new_zeros(extra, *table.shape[1:]) if fill is None else fill.expand(extra, *table.shape[1:])
            return torch.cat([table, new])

        for table in self.lora.values():
            table.a, table.b = more(table.a), more(table.b)
        weight, bias = self._base_patch(base)
        if self.patch_weight is not None and self.patch_bias is not None:
            self.patch_weight, self.patch_bias = more(self.patch_weight, weight), more(self.patch_bias, bias)
        if self.pos_embed is not None:
            self.pos_embed = more(self.pos_embed, base.pos_embed)

    @staticmethod
    def _base_patch(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        proj = base.patch_embed.proj
        weight = proj.weight.reshape(proj.weight.shape[0], -1)
        return weight, proj.weight.new_zeros(weight.shape[0]) if proj.bias is None else proj.bias

    def _write(self, slot: int, adapter: RoutedAdapter, base: nn.Module) -> None:
        if self._slot_of.get(self._ids[slot]) == slot:  # its last holder's entry
            del self._slot_of[self._ids[slot]]
        self._held[slot], self._ids[slot] = weakref.ref(adapter), id(adapter)
        self._slot_of[id(adapter)] = slot
        for path, pair in adapter.lora.items():
            self._fit(path, pair, base.pos_embed)
        for path, table in self.lora.items():
            table.write(slot, adapter.lora.get(path))
        weight, bias = self._base_patch(base)
        if adapter.patch_weight is not None and self.patch_weight is None:
            self.patch_weight = weight.expand(self.rows, *weight.shape).clone()
            self.patch_bias = bias.expand(self.rows, *bias.shape).clone()
        if self.patch_weight is not None:
            self.patch_weight[slot] = weight if adapter.patch_weight is None else adapter.patch_weight
            self.patch_bias[slot] = bias if adapter.patch_bias is None else adapter.patch_bias
        pos = base.pos_embed[0]
        if adapter.pos_embed is not None and self.pos_embed is None:
            self.pos_embed = pos.expand(self.rows, *pos.shape).clone()
        if self.pos_embed is not None:
            self.pos_embed[slot] = pos if adapter.pos_embed is None else adapter.pos_embed[0]

    def _fit(self, path: str, pair: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> None:
        """A table at ``path`` that holds ``pair``: made, or widened with every held adapter written again."""
        need = _Layout.of(pair)
        table = self.lora.get(path)
        if table is not None and table.layout.widened(need) == table.layout:
            return
        self._shapes.setdefault(path, _shape(pair))
        layout = need if table is None else table.layout.widened(need)
        self.lora[path] = new = _LoraTable.empty(layout, self.rows, self._shapes[path], like)
        for slot, ref in enumerate(self._held):
            adapter = None if ref is None else ref()
            if adapter is not None:
                new.write(slot, adapter.lora.get(path))

    def lora_factors(self, at: SampleIndex, paths: Iterable[str] | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each sample's factors per layer of ``paths`` (where any of a pass's adapters has LoRA), or of every
        table (a recorded pass: any resident adapter may be in its replays)."""
        return {path: self.lora[path].gather(at) for path in (self.lora if paths is None else paths)}

    @property
    def signature(self) -> tuple:
        """Where the tables are: each one's name, address, shape, strides and dtype. A recorded pass reads them
        there; while the signature stands, slots written in place are read by its replays."""
        tables = [("patch_weight", self.patch_weight), ("patch_bias", self.patch_bias), ("pos_embed", self.pos_embed)]
        tables += [(f"{path}.{n}", t) for path, table in self.lora.items() for n, t in (("a", table.a), ("b", table.b))]
        return tuple((name, t.data_ptr(), t.shape, t.stride(), t.dtype) for name, t in tables if t is not None)

    def patch(self, at: SampleIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's patch-embedding weight (B, D, C p p) and bias (B, D)."""
        if self.patch_weight is None or self.patch_bias is None:
            raise RuntimeError("slot tables: no adapter placed has its own patch embedding")
        return per_sample(self.patch_weight, at), per_sample(self.patch_bias, at)

    def positions(self, at: SampleIndex) -> torch.Tensor:
        """Each sample's position embeddings (B, tokens, D)."""
        if self.pos_embed is None:
            raise RuntimeError("slot tables: no adapter placed has its own position embeddings")
        return per_sample(self.pos_embed, at)
