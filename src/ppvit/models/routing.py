"""Many clients' adapters through one frozen ViT in one forward: per-sample routing.

A multi-tenant server holds one frozen backbone and, per client, an adapter: LoRA on some
Linear layers, a new head, and for ``lora-pe`` (or the key holder's ``--key-init``) its own
patch embedding (and position embeddings). Serving a batch that mixes clients the way PEFT
does (``adapter_names``: one sub-batch per adapter) runs the backbone once per client.
Here every sample of a mixed batch goes through the backbone together, and only the small
per-client parts differ, gathered per sample (the BGMV idea of Punica and S-LoRA):

* patch embedding: the image's patches (``unfold``) times the sample's own ``D x (C p p)``
  matrix, one batched matmul (``bmm``); clients without one use the backbone's;
* LoRA: for a routed Linear, ``y = W x + b + B_s (A_s x)`` with ``A_s``, ``B_s`` gathered per
  sample (ranks padded with zeros, the LoRA scale folded into ``B``): two ``bmm`` per layer;
* position embeddings per sample where a client has its own (key-init), the backbone's otherwise;
* heads: ``(classes x D)`` per client, one matrix product per client over its samples (not padded
  to the widest head: a neighbour's head of thousands of classes costs a sample nothing).

A batch of one client (one adapter) skips the gathering: its patch embedding runs as the
convolution, each LoRA layer as one product with ``W + B A`` merged for the pass, its head as a
shared matrix: the layers a merged model runs.
The backbone's weights are never copied or changed. ``full`` adapters change every weight and
cannot share a backbone: :class:`NotRoutable` (serve them with ``ppvit predict``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed

from ppvit.models.adapters import AdapterMeta
from ppvit.models.backbones import input_size, patch_size
from ppvit.models.configs import FullConfig, MeloConfig
from ppvit.models.graphs import Capture, PassGraphs
from ppvit.models.methods import ADAPTER, qv_stacked
from ppvit.models.slots import SampleIndex, SlotTables, per_sample

__all__ = ["NotRoutable", "RoutedAdapter", "RoutedLinear", "RoutedViT", "per_sample", "routed_adapter"]

MAX_ABS = 1e6
"""The largest magnitude an adapter's tensor may hold (trained weights are a few units; beyond this the
float32 forward overflows on ordinary inputs)."""


class NotRoutable(ValueError):
    """An adapter that cannot be served through a shared backbone (and why)."""


@dataclass(frozen=True)
class RoutedAdapter:
    """One client's tensors in the layout routing gathers from.

    ``lora`` maps a Linear's path (``blocks.0.attn.qkv``) to ``(A, B)``: ``A`` is ``R x in``,
    ``B`` is ``out x R`` with the LoRA scale folded in; q/v LoRA keeps its ``(2, d, r)`` B
    (:class:`~ppvit.models.methods.QVLoraB`), stacked to ``3d x 2r`` only when a batch gathers it with
    adapters of other ranks or layouts.
    """

    meta: AdapterMeta
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head_weight: torch.Tensor  # classes x D
    head_bias: torch.Tensor  # classes
    patch_weight: torch.Tensor | None = None  # D x (C p p), the conv weight flattened
    patch_bias: torch.Tensor | None = None  # D
    pos_embed: torch.Tensor | None = None  # 1 x tokens x D

    @property
    def nbytes(self) -> int:
        tensors = [self.head_weight, self.head_bias, self.patch_weight, self.patch_bias, self.pos_embed]
        tensors += [t for pair in self.lora.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    def to(self, device: torch.device | str) -> RoutedAdapter:
        """The same adapter with every tensor on ``device`` (kept there while it is cached)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        lora = {k: (a.to(device), b.to(device)) for k, (a, b) in self.lora.items()}
        return RoutedAdapter(
            self.meta,
            lora,
            move(self.head_weight),
            move(self.head_bias),
            move(self.patch_weight),
            move(self.patch_bias),
            move(self.pos_embed),
        )


def routed_adapter(meta: AdapterMeta, tensors: dict[str, torch.Tensor], base: nn.Module) -> RoutedAdapter:
    """An adapter's saved tensors (``ppvit_adapter.safetensors``) checked against ``base`` and laid out for routing."""
    method = meta.method_config()
    if isinstance(method, FullConfig):
        raise NotRoutable(
            "a full fine-tuning adapter replaces every weight of the backbone, so it cannot share one: "
            "serve it on its own with `ppvit predict`"
        )
    rest = dict(tensors)
    scale = method.lora_alpha / method.rank if isinstance(method, MeloConfig) else 1.0
    lora = {}
    for name in [k for k in tensors if k.endswith(f".lora_A.{ADAPTER}.weight")]:
        path = name.removesuffix(f".lora_A.{ADAPTER}.weight")
        if not path.startswith("blocks."):  # only the blocks' Linear layers are routed (e.g. not MAP pooling's)
            raise NotRoutable(f"LoRA of {path}: routing serves LoRA in the transformer blocks only")
        a, b = rest.pop(name), rest.pop(f"{path}.lora_B.{ADAPTER}.weight", None)
        if b is None:
            raise NotRoutable(f"LoRA of {path} has an A but no B")
        linear = _submodule(base, path)
        full_b = qv_stacked(b) if b.ndim == 3 else b  # q/v LoRA stays (2, d, r) in memory: a third of the stacked size
        fits = isinstance(linear, nn.Linear) and a.shape[1] == linear.in_features
        if not fits or full_b.shape != (linear.out_features, a.shape[0]):
            raise NotRoutable(f"LoRA of {path} ({tuple(a.shape)}, {tuple(b.shape)}) does not fit the backbone")
        lora[path] = (a.float().contiguous(), (b.float() * scale).contiguous())
    head_w, head_b = rest.pop("head.weight", None), rest.pop("head.bias", None)
    dim = base.embed_dim
    if head_w is None or head_b is None or head_w.shape[1:] != (dim,) or head_b.shape != head_w.shape[:1]:
        raise NotRoutable(f"the adapter needs a head of shape (classes, {dim}) with a bias")
    proj = base.patch_embed.proj
    patch_w, patch_b = rest.pop("patch_embed.proj.weight", None), rest.pop("patch_embed.proj.bias", None)
    if patch_b is not None and patch_w is None:  # no method trains it alone; routing would use it in some passes only
        raise NotRoutable("the adapter has a patch-embedding bias without its weight")
    if patch_w is not None:
        if patch_w.shape != proj.weight.shape:
            raise NotRoutable(f"patch embedding {tuple(patch_w.shape)}, the backbone's is {tuple(proj.weight.shape)}")
        patch_w = patch_w.float().reshape(patch_w.shape[0], -1).contiguous()
    pos = rest.pop("pos_embed", None)
    if pos is not None and pos.shape != base.pos_embed.shape:
        raise NotRoutable(f"position embeddings {tuple(pos.shape)}, the backbone's are {tuple(base.pos_embed.shape)}")
    if rest:
        raise NotRoutable(f"the adapter trains {', '.join(sorted(rest)[:3])}, which routing does not serve")
    classes = len(meta.classes) if meta.classes is not None else meta.num_classes
    if classes != head_w.shape[0]:  # an answer would index past the class list
        raise NotRoutable(f"the adapter names {classes} classes, its head has {head_w.shape[0]}")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NotRoutable(f"the adapter's {', '.join(sorted(bad)[:3])} hold NaN or infinite values")
    huge = [n for n, t in tensors.items() if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_ABS]
    if huge:  # finite, but an answer computed with them overflows (1e38: NaN probabilities)
        raise NotRoutable(f"the adapter's {', '.join(sorted(huge)[:3])} hold values beyond ±{MAX_ABS:g}")
    return RoutedAdapter(
        meta,
        lora,
        head_w.float().contiguous(),
        head_b.float().contiguous(),
        patch_w,
        None if patch_b is None else patch_b.float().contiguous(),
        None if pos is None else pos.float().contiguous(),
    )


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module.base if isinstance(module, RoutedLinear) else module


class _Deltas:
    """The gathered LoRA factors of the batch being computed, by layer path (shared by the layers).

    A value is ``(A, B)`` with ``A`` (batch, R, in) and ``B`` (batch, out, R), or for q/v LoRA
    ``(A, B_q, B_v)`` with ``B_q``, ``B_v`` (batch, d, r): the update goes into the q and v
    slices only, with no multiplication by the zero k rows. A pass of one adapter holds its own
    factors without the batch dimension (merged into the weight where that is cheaper), or ``(W + B A,)``,
    the weight merged by an earlier pass of the same adapter.
    """

    def __init__(self) -> None:
        self.by_path: dict[str, tuple[torch.Tensor, ...]] = {}


class RoutedLinear(nn.Module):
    """A frozen Linear plus, per sample, that sample's LoRA update (when its adapter has one here)."""

    def __init__(self, base: nn.Linear, path: str, deltas: _Deltas) -> None:
        super().__init__()
        self.base, self.path, self._deltas = base, path, deltas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self._deltas.by_path.get(self.path)
        weight, bias = self.base.weight, self.base.bias  # F.linear, not self.base(x): a module call fewer a layer
        if factors is not None and len(factors) == 1:  # merged by an earlier pass of this adapter
            return F.linear(x, factors[0], bias)
        if factors is not None and factors[0].ndim == 2 and merges(x, weight):  # one adapter's: W + B A, merged
            return F.linear(x, merged_weight(weight, factors), bias)
        y = F.linear(x, weight, bias)
        if factors is None:
            return y
        h = torch.matmul(x, factors[0].mT)  # per sample, (batch, ., .): batched; one adapter's, (., .): broadcast
        if len(factors) == 2:
            return y.baddbmm_(h, factors[1].mT) if factors[1].ndim == 3 else y + torch.matmul(h, factors[1].mT)
        b_q, b_v = factors[1], factors[2]
        d, r = b_q.shape[-2], b_q.shape[-1]
        y[..., :d] += torch.matmul(h[..., :r], b_q.mT)  # (baddbmm_ into these column slices: 2x slower on a CPU)
        y[..., 2 * d :] += torch.matmul(h[..., r:], b_v.mT)
        return y


def merges(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether merging ``B A`` into ``weight`` for this pass costs less than applying it to every token:
    out x R x in multiply-adds against tokens x R x (in + out) (a one-image ViT-B/16 pass keeps fc1's
    update apart: 197 x 3,840 is under 3,072 x 768)."""
    return x.shape[:-1].numel() * sum(weight.shape) >= weight.numel()


def merged_weight(weight: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``W + B A`` for one adapter's ``(A, B)`` or q/v ``(A, B_q, B_v)`` (B_q A_q into the q rows, B_v A_v into
    the v rows): a pass of one client runs each layer as one matrix product, the way a merged model does,
    where the update kept apart took five operators a layer (three GEMMs over every token, two adds)."""
    if len(factors) == 2:
        return torch.addmm(weight, factors[1], factors[0])
    a, b_q, b_v = factors
    d, r = b_q.shape
    return torch.cat([torch.addmm(weight[:d], b_q, a[:r]), weight[d : 2 * d], torch.addmm(weight[2 * d :], b_v, a[r:])])


class RoutedViT(nn.Module):
    """A frozen timm ViT that computes each sample of a batch with that sample's adapter.

    One forward at a time: the batch's LoRA factors are held on the module while it runs, and the adapters
    of passes that mix tenants are kept in its :class:`~ppvit.models.slots.SlotTables` (``slots`` adapters,
    ``slot_bytes`` bytes, before the least recently used is overwritten; the server calls it from a single
    worker thread).
    """

    def __init__(
        self,
        base: nn.Module,
        slots: int = 64,
        slot_bytes: int = 256 << 20,
        merged_bytes: int = 256 << 20,
        capture: Capture | None = None,
    ) -> None:
        super().__init__()
        _check_routable(base)
        self.base = base.eval().requires_grad_(False)
        self.patch, self.side = patch_size(base), input_size(base)
        self.in_channels = base.patch_embed.proj.in_channels
        self.slots = SlotTables(slots, slot_bytes)
        self.graphs = None if capture is None else PassGraphs(capture)
        self.merged_bytes = merged_bytes
        self._merged: tuple[weakref.ref[RoutedAdapter], torch.device, dict[str, tuple[torch.Tensor]]] | None = None
        self._deltas = _Deltas()
        self._linears: dict[str, nn.Linear] = {}
        for name, module in list(base.blocks.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                owner = base.blocks.get_submodule(parent) if parent else base.blocks
                self._linears[f"blocks.{name}"] = module
                setattr(owner, child, RoutedLinear(module, f"blocks.{name}", self._deltas))

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, adapters: list[RoutedAdapter], index: torch.Tensor | Sequence[int]
    ) -> list[torch.Tensor]:
        """Logits per sample (each of its adapter's class count): ``x`` (B, C, H, W) normalised,
        sample ``i`` through ``adapters[index[i]]`` (``index`` in the host's memory: the pass then never
        waits for the device, which only the caller's copy of the logits does). With ``capture``, every pass
        gathers from the slot tables and is replayed as a recorded graph (:mod:`ppvit.models.graphs`)."""
        index = SampleIndex.of(index, x.device)
        if self._merged is not None and self._merged[0]() is None:  # its adapter was dropped: so are they
            self._merged = None
        if len(index.host) != len(x) or not all(0 <= i < len(adapters) for i in index.host):
            raise IndexError(f"routing: {len(x)} images need as many adapter indices in 0..{len(adapters) - 1}")
        graphed = self.graphs is not None and self.graphs.usable(x)
        rows = None  # each sample's row of the tables, where the pass reads them
        if graphed or len(adapters) > 1:
            slots = self.slots.place(adapters, self.base)
            rows = tuple(slots[i] for i in index.host)
        features = None
        if graphed:
            features = self.graphs.run(x, rows, self.slots.signature, lambda x, at: self._gathered(x, at, None))
        if features is None and len(adapters) == 1:  # one client: its tensors as they are, shared
            one = adapters[0]
            pos = self.base.pos_embed if one.pos_embed is None else one.pos_embed
            features = self._features(x, self._embed_one(one), pos, self._one(one, x.device))
        elif features is None:
            features = self._gathered(x, SampleIndex(rows, x.device), adapters)
        return self._heads(features, adapters, index)

    def _gathered(self, x: torch.Tensor, at: SampleIndex, adapters: list[RoutedAdapter] | None) -> torch.Tensor:
        """A pass reading each sample's rows of the slot tables at ``at``: the tables the pass's ``adapters`` use,
        or (None: a recorded pass, whose replays may bring any resident adapter) every table there is."""

        def used(name: str) -> bool:  # the tables and the adapters name their patch and position tensors alike
            holders = [self.slots] if adapters is None else adapters
            return any(getattr(h, name) is not None for h in holders)

        embed = (lambda x: self._embed_rows(x, at)) if used("patch_weight") else self._embed_base
        pos = self.slots.positions(at) if used("pos_embed") else self.base.pos_embed
        paths = None if adapters is None else {p for a in adapters for p in a.lora}
        return self._features(x, embed, pos, self.slots.lora_factors(at, paths))

    def _features(
        self,
        x: torch.Tensor,
        embed: Callable[[torch.Tensor], torch.Tensor],
        pos: torch.Tensor,
        factors: dict[str, tuple[torch.Tensor, ...]],
    ) -> torch.Tensor:
        """The backbone's pre-logits with the pass's patch ``embed``, position embeddings (per sample or shared)
        and LoRA ``factors`` by layer path."""
        m = self.base
        tokens = m.patch_embed.norm(embed(x))
        prefix = [t.expand(len(x), -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:
            tokens = torch.cat([*prefix, tokens + pos], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + pos
        tokens = m.norm_pre(m.patch_drop(m.pos_drop(tokens)))
        self._deltas.by_path = factors
        try:
            return m.forward_head(m.norm(m.blocks(tokens)), pre_logits=True)
        finally:
            self._deltas.by_path = {}

    @property
    def copy_nbytes(self) -> int:
        """Bytes of the adapters' copies kept for speed: the slot tables and one adapter's merged weights."""
        held = self._merged  # (read once: /metrics calls this from another thread)
        merged = [] if held is None or held[0]() is None else [w for (w,) in held[2].values()]
        return self.slots.nbytes + sum(w.numel() * w.element_size() for w in merged)

    def _one(self, adapter: RoutedAdapter, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
        """One adapter's layers for a pass of its images alone: each LoRA'd weight merged (W + B A), kept for
        the adapter's next such pass (one adapter's, while their bytes are within ``merged_bytes``): a run of
        one tenant's passes then runs the merged model's operators, without merging again each pass (36
        operators a pass for q/v LoRA on ViT-Ti's 12 blocks). Beyond the bytes, its factors, as they are."""
        held = self._merged
        if held is not None and held[0]() is adapter and held[1] == device:
            return held[2]
        self._merged = None  # the last adapter's merged weights go (a pass of another adapter)
        factors = _factors(adapter, device)
        size = sum(self._linears[p].weight.numel() * self._linears[p].weight.element_size() for p in factors)
        if size > self.merged_bytes:
            return factors
        exact = torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else None
        with exact or contextlib.nullcontext():  # kept in the weights' dtype, whatever this pass's autocast
            merged = {p: (merged_weight(self._linears[p].weight, f),) for p, f in factors.items()}
        self._merged = (weakref.ref(adapter), device, merged)
        return merged

    @staticmethod
    def _heads(features: torch.Tensor, adapters: list[RoutedAdapter], index: SampleIndex) -> list[torch.Tensor]:
        """Each sample's logits through its own adapter's head: one matrix product per adapter over its
        rows, so a sample pays its own head's classes only (heads padded to the widest made every
        neighbour of a head of thousands of classes compute, and copy, thousands per image). The rows are
        gathered once, grouped by adapter, with an index copied to the device without waiting for it."""
        rows: dict[int, list[int]] = {}
        for j, i in enumerate(index.host):
            rows.setdefault(i, []).append(j)
        order = [j for js in rows.values() for j in js]
        if order != list(range(len(order))):
            features = features.index_select(0, SampleIndex.of(order, features.device).device)
        logits: dict[int, torch.Tensor] = {}
        for (i, js), mine in zip(rows.items(), features.split([len(js) for js in rows.values()]), strict=True):
            weight, bias = adapters[i].head_weight.to(mine.device), adapters[i].head_bias.to(mine.device)
            logits.update(zip(js, torch.addmm(bias, mine, weight.t()), strict=True))
        return [logits[j] for j in range(len(order))]

    def _embed_base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.patch_embed.proj(x).flatten(2).transpose(1, 2)

    def _embed_one(self, one: RoutedAdapter) -> Callable[[torch.Tensor], torch.Tensor]:
        """One adapter's patch embedding as the convolution it is (no unfold, no bmm); the backbone's without one."""
        if one.patch_weight is None:
            return self._embed_base
        proj = self.base.patch_embed.proj
        weight = one.patch_weight.to(proj.weight.device).view_as(proj.weight)
        bias = proj.bias if one.patch_bias is None else one.patch_bias.to(proj.weight.device)
        return lambda x: F.conv2d(x, weight, bias, stride=self.patch).flatten(2).transpose(1, 2)

    def _embed_rows(self, x: torch.Tensor, at: SampleIndex) -> torch.Tensor:
        """Each sample's patches times its own row of the patch table: one batched product."""
        weight, bias = self.slots.patch(at)
        patches = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, N, C p p), the conv's order
        return torch.baddbmm(bias.unsqueeze(1), patches, weight.transpose(1, 2))


def _factors(adapter: RoutedAdapter, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """One adapter's A and B per layer, shared by the pass (q/v LoRA's B as its B_q and B_v)."""
    return {
        path: (a.to(device), *(b.to(device).unbind(0) if b.ndim == 3 else (b.to(device),)))
        for path, (a, b) in adapter.lora.items()
    }


def _check_routable(model: nn.Module) -> None:
    """Refuse, in one line, a backbone whose embedding this module does not reproduce exactly."""
    pe = getattr(model, "patch_embed", None)
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or not pe.flatten:
        raise NotRoutable(f"routing needs timm's plain PatchEmbed, the model has {type(pe).__name__}")
    p = patch_size(model)
    if pe.proj.kernel_size != (p, p) or pe.proj.stride != (p, p) or getattr(model, "dynamic_img_size", False):
        raise NotRoutable("routing needs one p x p convolution with stride p and a fixed input size")
    if getattr(model, "pos_embed", None) is None:
        raise NotRoutable("routing needs a model with learned position embeddings")
