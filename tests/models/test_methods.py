"""Methods against independent arithmetic: parameter counts, gradients, the q/v-only LoRA update."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import SMALL
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import Linear as PeftLoraLinear

from ppvit import cli
from ppvit.models.backbones import create_backbone
from ppvit.models.methods import (
    METHODS,
    QVLoraLinear,
    apply_method,
    count_params,
    merge_adapters,
    method_config,
    param_report,
)

P16 = dict(img_size=32, depth=1, embed_dim=48, num_heads=3)  # on vit_tiny_patch16_224: 16x16 patches, 4 tokens
GEOMETRY = {  # d, depth, tokens incl. class token, values per patch
    "micro": (48, 2, 65, 4 * 4 * 3),
    "p16": (48, 1, 5, 16 * 16 * 3),
}
LORA_MODULES = {"qv": ("attn.qkv",), "qkv": ("attn.qkv",), "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def vit_counts(
    d: int, depth: int, tokens: int, patch: int, classes: int, rank: int = 4, targets: str = "qv"
) -> dict[str, int]:
    """Trainable parameters per method from a ViT's geometry (MLP 4d, biases everywhere, one class token)."""
    mlp = 4 * d
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (mlp * d + mlp) + (d * mlp + d)  # 2 norms, qkv, proj, mlp
    embed = patch * d + d + d + tokens * d  # patch weight + bias, class token, position embedding
    head = d * classes + classes
    full = embed + depth * block + 2 * d + head  # + final norm
    lora = {
        "qv": 2 * (rank * d + d * rank),  # MeLo: A and B for q and for v, nothing for k
        "qkv": rank * d + 3 * d * rank,
        "all": (rank * d + 3 * d * rank) + 2 * rank * d + (rank * d + mlp * rank) + (rank * mlp + d * rank),
    }[targets] * depth
    return {"full": full, "linear": head, "melo": lora + head, "lora-pe": lora + head + patch * d + d}


def test_paper_counts_for_vit_b16() -> None:
    expected = vit_counts(768, 12, 197, 16 * 16 * 3, 10)
    rows = {r.method: r for r in param_report("vit_base_patch16_224", 10)}
    assert {m: r.trainable for m, r in rows.items()} == expected
    # the figures, and the paper's 2^20 units
    assert expected == {"full": 85_806_346, "linear": 7_690, "melo": 155_146, "lora-pe": 745_738}
    assert round(rows["lora-pe"].trainable_mib, 2) == 0.71 and round(rows["melo"].trainable_mib, 2) == 0.15
    full_1000 = param_report("vit_base_patch16_224", 1000)[0]
    assert full_1000.trainable == vit_counts(768, 12, 197, 16 * 16 * 3, 1000)["full"] == 86_567_656
    assert round(full_1000.trainable_mib, 2) == 82.56
    # the LoRA layers add parameters; nothing is counted twice
    assert rows["melo"].total == expected["full"] + expected["melo"] - expected["linear"]
    assert rows["full"].total == rows["linear"].total == expected["full"]


@pytest.mark.parametrize(("targets", "rank"), [("qkv", 4), ("all", 4), ("qv", 16)])
def test_other_lora_targets_and_ranks_count(targets: str, rank: int) -> None:
    expected = vit_counts(768, 12, 197, 16 * 16 * 3, 10, rank=rank, targets=targets)
    rows = {row.method: row for row in param_report("vit_base_patch16_224", 10, targets=targets, rank=rank)}
    assert {m: r.trainable for m, r in rows.items()} == expected


def build(model: str, method: str, **opts: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    base = (
        create_backbone(SMALL, num_classes=5)
        if model == "micro"
        else create_backbone("vit_tiny_patch16_224", num_classes=5, **P16)
    )
    return apply_method(base, method_config(method, **opts))


def should_train(name: str, method: str, opts: dict[str, Any]) -> bool:
    """Which parameters a method trains, written from the paper's definitions."""
    if method == "full":
        return True
    lora = method in ("melo", "lora-pe") and any(f".{m}.lora_" in name for m in LORA_MODULES[opts.get("targets", "qv")])
    return (
        name.startswith("head.")
        or lora
        or (name.startswith("patch_embed.") and (method == "lora-pe" or opts.get("train_patch_embed", False)))
        or (name == "pos_embed" and opts.get("train_pos_embed", False))
        or (name == "cls_token" and opts.get("train_cls_token", False))
    )


CASES = [
    *[("micro", m, {}) for m in METHODS],
    ("micro", "melo", {"targets": "qkv"}),
    ("micro", "lora-pe", {"targets": "all", "rank": 2}),
    ("micro", "melo", {"train_pos_embed": True, "train_cls_token": True}),
    ("micro", "linear", {"train_patch_embed": True}),
    ("p16", "lora-pe", {}),
    ("p16", "melo", {"train_cls_token": True}),
]


@pytest.mark.parametrize(("model", "method", "opts"), CASES)
def test_exactly_the_method_parameters_train(model: str, method: str, opts: dict[str, Any]) -> None:
    net = build(model, method, **opts)
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in net.named_parameters():
        should = should_train(name, method, opts)
        assert p.requires_grad == should, name
        if should:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # and the count equals the geometry's
    d, depth, tokens, patch = GEOMETRY[model]
    lora_opts = {k: v for k, v in opts.items() if k in ("rank", "targets")}
    want = vit_counts(d, depth, tokens, patch, 5, **lora_opts)[method]
    extra = {"train_pos_embed": tokens * d, "train_cls_token": d, "train_patch_embed": patch * d + d}
    want += sum(n for flag, n in extra.items() if opts.get(flag))  # no case repeats a method's own default
    assert count_params(net).trainable == want


@pytest.mark.parametrize("targets", ["qv", "qkv", "all"])
def test_lora_goes_where_the_targets_say(targets: str) -> None:
    net = build("micro", "melo", targets=targets)
    wrapped = {n for n, m in net.named_modules() if isinstance(m, PeftLoraLinear)}
    assert wrapped == {f"blocks.{i}.{m}" for i in range(2) for m in LORA_MODULES[targets]}  # not patch_embed.proj
    kinds = {type(net.get_submodule(n)) for n in wrapped}
    assert kinds == ({QVLoraLinear} if targets == "qv" else {PeftLoraLinear})


def test_lora_b_starts_at_zero_so_the_model_starts_as_the_base() -> None:
    torch.manual_seed(0)
    base = create_backbone(SMALL, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    want = base(x)
    got = apply_method(base, method_config("melo")).eval()(x)
    torch.testing.assert_close(got, want)


def randomised_qv_layer(rank: int = 3, alpha: float = 5.0) -> QVLoraLinear:
    layer = build("micro", "melo", rank=rank, alpha=alpha).blocks[0].attn.qkv
    assert isinstance(layer, QVLoraLinear)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def test_qv_lora_update_is_b_a_x_scaled_and_leaves_k_alone() -> None:
    layer = randomised_qv_layer(rank=3, alpha=5.0)
    d = layer.in_features
    a = layer.lora_A["default"].weight  # (2r, d): A_q then A_v
    b = layer.lora_B["default"].weight  # (2, d, r): B_q, B_v
    assert a.shape == (6, d) and b.shape == (2, d, 3)  # MeLo's 2 r (d + d) values, no key matrices
    x = torch.randn(7, d)
    delta = layer(x) - layer.base_layer(x)
    scale = 5.0 / 3
    torch.testing.assert_close(delta[:, :d], x @ a[:3].T @ b[0].T * scale)
    torch.testing.assert_close(delta[:, d : 2 * d], torch.zeros(7, d))
    torch.testing.assert_close(delta[:, 2 * d :], x @ a[3:].T @ b[1].T * scale)
    assert layer.scaling["default"] == pytest.approx(scale)


def test_qv_merge_and_unmerge_through_peft() -> None:
    layer = randomised_qv_layer(rank=3, alpha=5.0)
    d = layer.in_features
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, d)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        w = layer.base_layer.weight.detach().clone()
        merged = layer(x)  # the base layer alone now
        layer.unmerge()
    scale = 5.0 / 3
    torch.testing.assert_close(w[:d], w0[:d] + b[0] @ a[:3] * scale)
    assert torch.equal(w[d : 2 * d], w0[d : 2 * d])
    torch.testing.assert_close(w[2 * d :], w0[2 * d :] + b[1] @ a[3:] * scale)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_peft_state_dict_round_trip_with_the_qv_layer() -> None:
    trained = build("micro", "melo")
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if ".lora_" in name or name.startswith("head."):
                p.normal_(std=0.1)
    state = get_peft_model_state_dict(trained)
    assert set(state) == {f"blocks.{i}.attn.qkv.lora_{ab}.weight" for i in range(2) for ab in "AB"}
    fresh = build("micro", "melo")
    assert not set_peft_model_state_dict(fresh, state).unexpected_keys
    fresh.head.load_state_dict(trained.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_training_steps_leave_the_key_rows_untouched() -> None:
    model = build("micro", "melo")
    qkv_before = [blk.attn.qkv.base_layer.weight.clone() for blk in model.blocks]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    merge_adapters(model)
    for blk, before in zip(model.blocks, qkv_before, strict=True):
        after = blk.attn.qkv.weight
        assert type(blk.attn.qkv) is torch.nn.Linear
        assert torch.equal(after[48:96], before[48:96])  # k rows: bit for bit
        assert not torch.allclose(after[:48], before[:48]) and not torch.allclose(after[96:], before[96:])


@pytest.mark.parametrize("method", ["melo", "lora-pe"])
@pytest.mark.parametrize("targets", ["qv", "qkv", "all"])
def test_merge_gives_a_plain_model_with_equal_outputs(method: str, targets: str) -> None:
    """Tolerance: rtol = atol = 1e-5 in float32 (merging reorders the sums)."""
    model = build("micro", method, targets=targets).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    merged = merge_adapters(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    plain = create_backbone(SMALL, num_classes=5)
    plain.load_state_dict(merged.state_dict())  # timm's own keys
    torch.testing.assert_close(plain.eval()(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "opts", "message"),
    [
        ("lora", {}, "unknown method 'lora'"),
        ("melo", {"rank": 0}, "rank must be at least 1"),
        ("melo", {"targets": "kv"}, "method melo: targets 'kv': must be one of qv, qkv, all"),
        ("melo", {"alpha": -1.0}, "alpha must be positive"),
        ("melo", {"alpha": float("nan")}, "method melo: alpha nan: must be a finite number or null"),
        ("lora-pe", {"alpha": float("inf")}, "method lora-pe: alpha inf: must be a finite number or null"),
        ("lora-pe", {"rank": "8"}, "method lora-pe: rank '8': must be an integer"),  # an adapter edited by hand
        ("melo", {"train_pos_embed": 1}, "method melo: train_pos_embed 1: must be true or false"),
        ("lora-pe", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ("full", {"rank": 8}, "method full takes no rank"),
    ],
)
def test_bad_method_configs(name: str, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method_config(name, **opts)


def test_alpha_defaults_to_the_rank_and_is_a_float() -> None:
    melo = method_config("melo", rank=8)
    assert melo.alpha is None and melo.lora_alpha == 8.0  # unset: follows the rank (scale 1)
    assert dataclasses.replace(melo, rank=2).lora_alpha == 2.0
    cfg = method_config("lora-pe", alpha=16)
    assert isinstance(cfg.alpha, float) and cfg.to_dict()["alpha"] == 16.0 and cfg.train_patch_embed


def test_params_cli_prints_exact_counts_and_percentages(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["params", "--model", SMALL, "--num-classes", "5", "--rank", "2", "--targets", "qkv"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    want = vit_counts(*GEOMETRY["micro"], 5, rank=2, targets="qkv")
    for method, n in want.items():
        exact, millions, mib, pct, total = lines[method][1:]
        assert int(exact.replace(",", "")) == n
        assert float(millions) == round(n / 1e6, 3) and float(mib) == round(n / 2**20, 2)
        assert float(pct.rstrip("%")) == pytest.approx(100 * n / want["full"], abs=5e-4)
        lora = want["melo"] - want["linear"] if method in ("melo", "lora-pe") else 0
        assert int(total.replace(",", "")) == want["full"] + lora  # the frozen backbone counts, once
