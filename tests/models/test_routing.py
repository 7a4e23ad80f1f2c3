"""Routed forwards: what one tenant's head costs its neighbours in the same pass (issue 31, item 3)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL
from torch.utils.flop_counter import FlopCounterMode

from ppvit.models.adapters import AdapterMeta
from ppvit.models.backbones import create_backbone
from ppvit.models.methods import apply_method, merge_adapters, method_config
from ppvit.models.routing import NotRoutable, RoutedLinear, RoutedViT, _Deltas, merges, routed_adapter


def trained(classes: int, seed: int, method: str = "lora-pe", **opts) -> torch.nn.Module:
    """A model of ``method`` with random trained tensors (LoRA B non-zero)."""
    torch.manual_seed(seed)
    model = apply_method(create_backbone(SMALL, num_classes=classes), method_config(method, **opts))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def routed(base: torch.nn.Module, classes: int, seed: int, method: str = "lora-pe", **opts):
    """That model's adapter, laid out for routing over ``base``."""
    model = trained(classes, seed, method, **opts)
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    meta = AdapterMeta(SMALL, classes, method_config(method, **opts).to_dict(), weights_sha256="x")
    return routed_adapter(meta, tensors, base)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_a_wide_head_in_the_pass_costs_its_neighbours_nothing() -> None:
    """A 10-class tenant's images beside a 4,000-class tenant's image: the pass costs what the same pass
    with a 10-class neighbour costs, plus the wide head's own row (the heads were padded to the widest, so
    the small tenant's rows paid 4,000 classes), and each row is its own adapter's answer."""
    base = create_backbone(SMALL)
    net = RoutedViT(base)
    small, wide, narrow = routed(base, 10, 0), routed(base, 4000, 1), routed(base, 10, 2)
    x, index = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 0])
    mixed = flops(lambda: net(x, [small, wide], index))
    assert mixed == flops(lambda: net(x, [small, narrow], index)) + 2 * base.embed_dim * (4000 - 10)
    rows = net(x, [small, wide], index)
    assert [len(r) for r in rows] == [10, 4000, 10]
    torch.testing.assert_close(rows[1], net(x[1:2], [wide], torch.tensor([0]))[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.stack([rows[0], rows[2]]), torch.stack(net(x[[0, 2]], [small], torch.tensor([0, 0]))), rtol=0, atol=1e-5
    )


def test_one_clients_pass_runs_the_merged_models_layers() -> None:
    """A pass of one client's images costs what a merged model's pass costs, plus merging each LoRA layer's
    update into its weight (B A: out x rank x in multiply-adds a layer), not a LoRA product over every token."""
    torch.manual_seed(0)
    base = create_backbone(SMALL, num_classes=10)  # the frozen weights trained() starts from with seed 0
    net, adapter = RoutedViT(base), routed(base, 10, 0, "melo", rank=2, targets="all")
    x = torch.randn(5, 3, 32, 32)
    plain = merge_adapters(trained(10, 0, "melo", rank=2, targets="all"))  # the same tensors, merged by PEFT
    linears = [m for m in base.blocks.modules() if isinstance(m, torch.nn.Linear)]
    merging = sum(2 * m.out_features * 2 * m.in_features for m in linears)  # rank 2
    with torch.no_grad():
        assert flops(lambda: net(x, [adapter], [0] * 5)) == flops(lambda: plain(x)) + merging
        torch.testing.assert_close(torch.stack(net(x, [adapter], [0] * 5)), plain(x), rtol=0, atol=1e-5)


KINDS = [  # every kind routing gathers: patch and position embeddings, q/v LoRA of two ranks, LoRA on every Linear
    (10, "lora-pe", {"rank": 4}),
    (7, "melo", {"rank": 2, "alpha": 8.0, "targets": "all"}),
    (3, "linear", {}),
    (5, "lora-pe", {"rank": 8, "targets": "qkv", "train_pos_embed": True}),
]


@pytest.mark.parametrize(
    ("kinds", "index"),
    [
        ([0], [0, 0, 0]),  # one client: the shared-matrix path
        ([0, 3], [0, 1]),  # distinct tenants in order: no gather
        ([0, 3], [1, 0, 1, 1]),  # q/v LoRA of two ranks, interleaved
        ([0, 1, 2, 3], [3, 0, 2, 1, 1, 0, 2, 3]),  # every kind, mixed
        ([2, 2], [1, 0]),  # heads only
    ],
)
def test_a_pass_never_waits_for_the_device(kinds: list[int], index: list[int]) -> None:
    """The whole routed forward runs on the meta device (shapes, no values): any step that reads a value
    back from the device (``bool()``, ``.item()``, ``.tolist()`` of a device tensor) raises there. On a GPU
    each such read made the host wait for every kernel queued before it, once a layer and once a head."""
    base = create_backbone(SMALL)
    adapters = []
    for seed, k in enumerate(kinds):
        classes, method, opts = KINDS[k]
        adapters.append(routed(base, classes, seed, method, **opts).to("meta"))
    net = RoutedViT(base.to("meta"))
    rows = net(torch.empty(len(index), 3, 32, 32, device="meta"), adapters, torch.tensor(index))
    assert [tuple(r.shape) for r in rows] == [(KINDS[kinds[i]][0],) for i in index]
    assert all(r.device.type == "meta" for r in rows)


@pytest.mark.parametrize("tokens", [2, 4096])  # 2 x (512 + 1536) < 1536 x 512: the update kept apart; 4096: merged
@pytest.mark.parametrize("qv", [False, True])
def test_one_adapters_layer_is_w_x_plus_b_a_x_merged_where_cheaper(tokens: int, qv: bool) -> None:
    """A routed Linear with one adapter's factors computes W x + b + B A x whichever way it goes, and merges
    B A into W only where that costs fewer multiply-adds than the update over the pass's tokens."""
    torch.manual_seed(0)
    base, d, r = torch.nn.Linear(512, 1536), 512, 4
    deltas = _Deltas()
    layer = RoutedLinear(base, "qkv", deltas)
    x, a = torch.randn(1, tokens, 512), torch.randn(2 * r, 512) / 20
    zero = torch.zeros(d, r)
    if qv:  # B_q into the q rows, B_v into the v rows: the stacked B is block-diagonal with zero k rows
        b_q, b_v = torch.randn(d, r) / 20, torch.randn(d, r) / 20
        deltas.by_path = {"qkv": (a, b_q, b_v)}
        b = torch.cat([torch.cat([b_q, zero], 1), torch.zeros(d, 2 * r), torch.cat([zero, b_v], 1)])
        merge, apart = 2 * (2 * d * r * 512), 2 * tokens * 512 * 2 * r + 2 * (2 * tokens * r * d)
    else:
        b = torch.randn(1536, 2 * r) / 20
        deltas.by_path = {"qkv": (a, b)}
        merge, apart = 2 * 1536 * 2 * r * 512, 2 * tokens * 512 * 2 * r + 2 * tokens * 2 * r * 1536
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ a.T @ b.T, rtol=1e-4, atol=1e-4)
        assert merges(x, base.weight) is (tokens == 4096)
        assert flops(lambda: layer(x)) == flops(lambda: base(x)) + (merge if tokens == 4096 else apart)


def test_an_index_out_of_range_is_refused_on_the_host() -> None:
    """Checked before any gather (on a GPU an out-of-range index_select is a device assert that breaks the
    process's CUDA context)."""
    base = create_backbone(SMALL)
    net, adapters = RoutedViT(base), [routed(base, 10, 0), routed(base, 10, 1)]
    x = torch.randn(2, 3, 32, 32)
    for index in ([0, 2], [-1, 0], [0]):
        with pytest.raises(IndexError, match="adapter indices"):
            net(x, adapters, index)


@pytest.mark.parametrize("merged_bytes", [256 << 20, 0])
def test_a_run_of_one_clients_passes_merges_once(merged_bytes: int) -> None:
    """One client's second pass runs exactly the merged model's FLOPs (its W + B A kept from the first),
    unless the merged weights exceed ``merged_bytes``; a pass of another client in between merges its own,
    and every pass answers what PEFT's merged model answers."""
    torch.manual_seed(0)
    base = create_backbone(SMALL, num_classes=10)
    net = RoutedViT(base, merged_bytes=merged_bytes)
    first, other = routed(base, 10, 0, "melo", rank=2, targets="all"), routed(base, 10, 0, "melo", rank=2)
    plain = {
        0: merge_adapters(trained(10, 0, "melo", rank=2, targets="all")),
        1: merge_adapters(trained(10, 0, "melo", rank=2)),
    }
    x = torch.randn(5, 3, 32, 32)
    linears = [m for m in base.blocks.modules() if isinstance(m, torch.nn.Linear)]
    merging = {0: sum(2 * m.out_features * 2 * m.in_features for m in linears), 1: 0}
    merging[1] = sum(
        2 * 2 * (base.embed_dim * 2 * base.embed_dim) for m in linears if m.out_features == 3 * base.embed_dim
    )
    for seed, adapter, again in [(0, first, False), (0, first, True), (1, other, False), (0, first, False)]:
        with torch.no_grad():
            spent = flops(lambda adapter=adapter: net(x, [adapter], [0] * 5))
            expected = flops(lambda seed=seed: plain[seed](x)) + (0 if again and merged_bytes else merging[seed])
            assert spent == expected, (seed, again)
            torch.testing.assert_close(torch.stack(net(x, [adapter], [0] * 5)), plain[seed](x), rtol=0, atol=1e-5)
    assert net.copy_nbytes == (sum(4 * m.weight.numel() for m in linears) if merged_bytes else 0)  # first's, kept


def test_a_patch_bias_without_its_weight_is_refused() -> None:
    """No method trains the bias alone; served, it would count in a pass that gathers embeddings only."""
    base = create_backbone(SMALL)
    model = trained(10, 0, "linear")
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors["patch_embed.proj.bias"] = torch.ones(base.embed_dim)
    meta = AdapterMeta(SMALL, 10, method_config("linear").to_dict(), weights_sha256="x")
    with pytest.raises(NotRoutable, match="bias without its weight"):
        routed_adapter(meta, tensors, base)


def test_kept_merged_weights_are_exact_after_autocast_and_go_with_their_adapter() -> None:
    """A one-client pass under bf16 autocast keeps float32 merged weights (a float32 pass after it answers what
    PEFT's merge does), and they are dropped, and no longer counted, once their adapter is."""
    torch.manual_seed(0)
    base = create_backbone(SMALL, num_classes=10)
    net, adapter = RoutedViT(base), routed(base, 10, 0, "melo", rank=2, targets="all")
    plain, x = merge_adapters(trained(10, 0, "melo", rank=2, targets="all")), torch.randn(3, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, [adapter], [0] * 3)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(net(x, [adapter], [0] * 3)), plain(x), rtol=0, atol=1e-5)
    assert net.copy_nbytes > 0
    del adapter
    assert net.copy_nbytes == 0
