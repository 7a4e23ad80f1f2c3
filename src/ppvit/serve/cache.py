"""Adapters ready to serve: an LRU cache of each tenant's routed tensors over shared frozen bases.

Adapters load lazily, one load per (tenant, version) at a time, and are dropped least recently
used beyond a byte budget. Adapters with the same base identity (model, the actual weights file's
hash, init seed, input size) share one backbone. An adapter that cannot be loaded fails its own
tenant's requests with 503 and nobody else's.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppvit._io import file_sha256
from ppvit.data.preprocess import Preprocess, normalize
from ppvit.models.adapters import (
    AdapterMeta,
    adapter_preprocess,
    build_base,
    read_adapter_meta,
    read_adapter_tensors,
)
from ppvit.models.graphs import cuda_graph
from ppvit.models.routing import RoutedAdapter, RoutedViT, routed_adapter
from ppvit.serve.auth import HTTPError
from ppvit.serve.tenants import TenantAdapter, check_meta

log = logging.getLogger(__name__)


@dataclass
class Served:
    """A tenant's adapter, ready: its base (shared), its routed tensors and input checks."""

    tenant: TenantAdapter
    adapter: RoutedAdapter
    base: Base
    preprocess: Preprocess  # the adapter's input recipe (its own record, or timm's config for an old adapter)
    # answers that depend on the adapter version only, encoded once and kept as long as it is (codec.adapter_answer)
    encoded: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def meta(self) -> AdapterMeta:
        return self.adapter.meta


@dataclass
class Base:
    """One frozen backbone shared by every adapter trained on it."""

    routed: RoutedViT
    device: torch.device

    def forward(
        self,
        images: list[torch.Tensor],
        mean: torch.Tensor,
        std: torch.Tensor,
        adapters: list[RoutedAdapter],
        index: torch.Tensor,
    ) -> list[torch.Tensor]:
        """One routed pass from the requests' images as they arrived ((n, H, W, C) pieces in the host's
        memory, B images in all) to each image's logits in the host's memory; ``mean``/``std`` per channel,
        (C,), or per image, (B, C). Run in the batcher's forward thread, copies and all.

        The images cross to the device as they are (uint8: a quarter of float32's bytes; a pass mixing
        ciphertext dtypes as float32) and are normalised there, and the logits come back in one copy per head
        width: the answers then read them without a device sync each (on a GPU, every ``.tolist()`` of a row
        on the device waited for the pass after it)."""
        if len({t.dtype for t in images}) > 1:  # e.g. a lift tenant's int32 beside a mix tenant's float16
            images = [t.float() for t in images]  # not cat's promotion (float16: int32 values rounded)
        x = normalize(torch.cat(images).to(self.device).permute(0, 3, 1, 2), mean, std)
        return to_host(self.routed(x, adapters, index))


def to_host(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rows`` (one per image, each its head's width) in the host's memory: one copy per width (on the
    host too, where it costs a copy of the logits: one path on every device)."""
    by_width: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        by_width.setdefault(r.shape[-1], []).append(j)
    out: list[torch.Tensor] = [rows[0]] * len(rows)
    for js in by_width.values():
        for j, row in zip(js, torch.stack([rows[j] for j in js]).cpu(), strict=True):
            out[j] = row
    return out


def base_identity(meta: AdapterMeta, weights_sha256: str | None) -> str:
    """Adapters with the same identity share one backbone: the weights file's own hash (a file may
    stand in for timm's download, which the adapter does not record), and for a random-init base
    its head size too."""
    weights = weights_sha256 or meta.weights_sha256
    ident = [meta.model, weights, meta.pretrained, meta.init_seed, sorted(meta.model_kwargs.items())]
    if meta.init_seed is not None:
        ident.append(meta.num_classes)
    return json.dumps(ident)


class AdapterCache:
    """Adapters by (tenant, version), least recently used dropped beyond ``budget`` bytes; bases built once,
    each with slot tables of ``slots`` adapters and ``slot_bytes`` (copies of adapters for mixed passes, not in
    ``budget``), and with ``cuda_graphs`` its passes replayed as recorded CUDA graphs.

    The cache's lock guards only its dictionaries: a slow load (a base model built, a weights
    file hashed) holds a lock of its own key, so other tenants' requests are not held up by it.
    """

    def __init__(
        self, budget: int, device: str, slots: int = 64, slot_bytes: int = 256 << 20, cuda_graphs: bool = False
    ) -> None:
        self.budget, self.device, self.slots, self.slot_bytes = budget, torch.device(device), slots, slot_bytes
        self.cuda_graphs = cuda_graphs
        self.adapters: OrderedDict[tuple[int, int], Served] = OrderedDict()
        self.bases: dict[str, Base] = {}
        self.resident_bytes = 0
        self.lock = threading.Lock()  # the dictionaries and the byte count
        self._loading: dict[tuple[int, int], threading.Lock] = {}
        self._base_lock = threading.Lock()
        self._digests: dict[tuple[str, int, int], str] = {}  # weights files hashed, by path, size and mtime

    def resident(self, tenant: TenantAdapter) -> Served | None:
        """The tenant's adapter if it is in memory, else None, without waiting for any load: the event loop
        asks this first and hands only a load to a thread (a thread hop per request cost more than the lookup)."""
        with self.lock:
            served = self.adapters.get(tenant.cache_key)
            if served is not None:
                self.adapters.move_to_end(tenant.cache_key)
            return served

    def get(self, tenant: TenantAdapter) -> Served:
        key = tenant.cache_key
        served = self.resident(tenant)
        if served is not None:
            return served
        with self.lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key; others wait here, not on the cache
            with self.lock:
                if key in self.adapters:
                    return self.adapters[key]
            served = self._load(tenant)
            with self.lock:
                self.adapters[key] = served
                self.resident_bytes += served.adapter.nbytes
                while self.resident_bytes > self.budget and len(self.adapters) > 1:
                    self.resident_bytes -= self.adapters.popitem(last=False)[1].adapter.nbytes
                self._loading.pop(key, None)
            return served

    def _load(self, tenant: TenantAdapter) -> Served:
        try:
            meta = read_adapter_meta(tenant.folder)
            check_meta(meta, tenant.folder)
            base = self._base(meta, tenant)
            tensors = read_adapter_tensors(tenant.folder, meta)
            adapter = routed_adapter(meta, tensors, base.routed.base).to(self.device)
            preprocess = adapter_preprocess(meta, base.routed.base)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("tenant %s, adapter version %d: %s", tenant.tenant, tenant.version, exc)
            raise HTTPError(
                503, f"the adapter of tenant {tenant.tenant} cannot be loaded (see the server log)"
            ) from None
        return Served(tenant, adapter, base, preprocess)

    def _digest(self, path: Path | None) -> str | None:
        if path is None:
            return None
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    def _base(self, meta: AdapterMeta, tenant: TenantAdapter) -> Base:
        with self._base_lock:
            ident = base_identity(meta, self._digest(tenant.weights))
            if ident not in self.bases:
                model = build_base(meta, tenant.weights).to(self.device)
                capture = cuda_graph(self.device) if self.cuda_graphs else None
                routed = RoutedViT(model, self.slots, self.slot_bytes, capture=capture)
                self.bases[ident] = Base(routed, self.device)
            return self.bases[ident]
