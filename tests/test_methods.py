"""Methods against independent arithmetic: parameter counts, gradients, the q/v-only LoRA update."""

from __future__ import annotations

import pytest
import torch

from ppvit.backbones import create_backbone
from ppvit.methods import (
    METHODS,
    QVLoraLinear,
    apply_method,
    count_params,
    merge_adapters,
    method_config,
    param_report,
)

SMALL = "vit_micro_d2_patch4_32"


def vit_b_counts(classes: int, rank: int = 4) -> dict[str, int]:
    """ViT-B/16 from its geometry: d=768, 12 blocks, MLP 3072, 16x16x3 patches, 197 tokens."""
    d, depth, mlp, patch = 768, 12, 3072, 16 * 16 * 3
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (mlp * d + mlp) + (d * mlp + d)  # 2 norms, qkv, proj, mlp
    embed = patch * d + d + d + 197 * d  # patch weight + bias, cls token, position embedding
    head = d * classes + classes
    full = embed + depth * block + 2 * d + head  # + final norm
    lora_qv = depth * 2 * (rank * d + d * rank)  # A and B for q and for v
    return {"full": full, "linear": head, "melo": lora_qv + head, "lora-pe": lora_qv + head + patch * d + d}


def test_paper_counts_for_vit_b16() -> None:
    expected = vit_b_counts(10)
    rows = {r.method: r for r in param_report("vit_base_patch16_224", 10)}
    assert {m: r.trainable for m, r in rows.items()} == expected
    # the figures, and the paper's 2^20 units
    assert expected == {"full": 85_806_346, "linear": 7_690, "melo": 155_146, "lora-pe": 745_738}
    assert round(rows["lora-pe"].trainable_mib, 2) == 0.71 and round(rows["melo"].trainable_mib, 2) == 0.15
    full_1000 = param_report("vit_base_patch16_224", 1000)[0]
    assert full_1000.trainable == vit_b_counts(1000)["full"] == 86_567_656
    assert round(full_1000.trainable_mib, 2) == 82.56
    # the LoRA layers add parameters; nothing is counted twice
    assert rows["melo"].total == expected["full"] + expected["melo"] - expected["linear"]


@pytest.mark.parametrize("targets", ["qkv", "all"])
def test_other_lora_targets_count(targets: str) -> None:
    d, r, depth, mlp = 768, 4, 12, 3072
    per_block = {
        "qkv": r * d + 3 * d * r,
        "all": (r * d + 3 * d * r) + 2 * r * d + (r * d + mlp * r) + (r * mlp + d * r),
    }
    rows = {row.method: row for row in param_report("vit_base_patch16_224", 10, targets=targets)}
    assert rows["melo"].trainable == depth * per_block[targets] + 7690


def small_model(method: str, **opts) -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_method(create_backbone(SMALL, num_classes=5), method_config(method, **opts))


TRAINABLE = {
    "full": lambda n: True,
    "linear": lambda n: n.startswith("head."),
    "melo": lambda n: n.startswith("head.") or ".lora_" in n,
    "lora-pe": lambda n: n.startswith(("head.", "patch_embed.")) or ".lora_" in n,
}


@pytest.mark.parametrize("method", list(METHODS))
def test_exactly_the_method_parameters_get_gradients(method: str) -> None:
    model = small_model(method)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        should = TRAINABLE[method](name)
        assert p.requires_grad == should, name
        if should and ".lora_B" not in name and ".lora_A" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        if not should:
            assert p.grad is None, name


def test_lora_b_starts_at_zero_so_the_model_starts_as_the_base() -> None:
    torch.manual_seed(0)
    base = create_backbone(SMALL, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    want = base(x)
    got = apply_method(base, method_config("melo")).eval()(x)
    torch.testing.assert_close(got, want)


def test_qv_lora_update_is_b_a_x_scaled_and_leaves_k_alone() -> None:
    model = small_model("melo", rank=3, alpha=5.0)
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, QVLoraLinear)
    d = layer.in_features
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a = layer.lora_A["default"].weight  # (2r, d): A_q then A_v
    b = layer.lora_B["default"].weight  # (2, d, r): B_q, B_v
    x = torch.randn(7, d)
    delta = layer(x) - layer.base_layer(x)
    scale = 5.0 / 3
    torch.testing.assert_close(delta[:, :d], x @ a[:3].T @ b[0].T * scale)
    torch.testing.assert_close(delta[:, d : 2 * d], torch.zeros(7, d))
    torch.testing.assert_close(delta[:, 2 * d :], x @ a[3:].T @ b[1].T * scale)
    assert layer.scaling["default"] == pytest.approx(scale)


def test_training_steps_leave_the_key_rows_untouched() -> None:
    model = small_model("melo")
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
        torch.testing.assert_close(after[48:96], before[48:96], rtol=0, atol=0)  # k rows: bit for bit
        assert not torch.allclose(after[:48], before[:48]) and not torch.allclose(after[96:], before[96:])


@pytest.mark.parametrize("method", ["melo", "lora-pe"])
@pytest.mark.parametrize("targets", ["qv", "qkv", "all"])
def test_merge_gives_a_plain_model_with_equal_outputs(method: str, targets: str) -> None:
    model = small_model(method, targets=targets).eval()
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


def test_flags_for_position_embedding_and_class_token() -> None:
    model = small_model("melo", train_pos_embed=True, train_cls_token=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"pos_embed", "cls_token"} <= trainable
    d, tokens = 48, (32 // 4) ** 2 + 1  # 64 patch tokens and the class token
    assert count_params(model).trainable == count_params(small_model("melo")).trainable + tokens * d + d


@pytest.mark.parametrize(
    ("name", "opts", "message"),
    [
        ("lora", {}, "unknown method 'lora'"),
        ("melo", {"rank": 0}, "rank must be at least 1"),
        ("melo", {"targets": "kv"}, "targets must be qv, qkv or all"),
        ("full", {"rank": 8}, "method full takes no rank"),
    ],
)
def test_bad_method_configs(name: str, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method_config(name, **opts)


def test_lora_pe_is_melo_plus_the_patch_embedding() -> None:
    melo, lora_pe = count_params(small_model("melo")), count_params(small_model("lora-pe"))
    assert lora_pe.trainable - melo.trainable == 4 * 4 * 3 * 48 + 48
