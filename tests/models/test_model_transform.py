"""Key-based model transformation: equal logits on encrypted inputs, refusals, the CLI.

Every exactness check runs the real pipeline, uint8 image -> encrypt -> /255 -> per-channel
normalisation -> model, and compares with the original model on the plain image. The
tolerance is a max abs logit difference of 1e-4 in float32; logits are of order 10 (the
random-init weights are scaled so that attention depends on position and the key visibly
matters).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KEY, SMALL, assert_no_key_material
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.models.backbones import create_backbone
from ppvit.models.transform import block_map, keyed_embedding, transform_model

ABSORBABLE = [
    "shuffle",
    "scramble",
    "shuffle+scramble",
    "scramble+shuffle",
    "negpos:pixel",
    "channel:pixel",
    "channel:pixel+negpos:pixel+shuffle+scramble",
    "scramble+negpos:pixel+shuffle+channel:pixel",
]
ALL_STEPS = "scramble+negpos:pixel+shuffle+channel:pixel"
UNIFORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TOLERANCE = 1e-4  # max abs logit difference, float32


def normalise(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """The server's pipeline: uint8 NHWC -> [0, 1] -> per-channel normalisation, NCHW."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def make_model(name: str, **kwargs) -> torch.nn.Module:
    """A random-init model in eval mode whose position embeddings and head are not negligible."""
    torch.manual_seed(0)
    m = create_backbone(name, num_classes=10, **kwargs).eval()
    with torch.no_grad():  # like a trained model: position-dependent attention, logits of order 10
        if m.pos_embed is not None:
            m.pos_embed.normal_(std=0.5)
        for block in m.blocks:
            block.attn.qkv.weight.mul_(3)
        m.head.weight.normal_(std=4 / m.embed_dim**0.5)
    return m


def images(model: torch.nn.Module, n: int = 2, seed: int = 1) -> np.ndarray:
    side = model.patch_embed.img_size[0]
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def check_exact(model: torch.nn.Module, scheme: str, norm: tuple, x: np.ndarray, plain: torch.Tensor) -> None:
    """The transformed copy on ciphertext gives ``plain`` (the original's logits on ``x``); the original does not."""
    enc = BlockCipher(KEY, scheme, model.patch_embed.patch_size[0]).encrypt(x)
    transformed = transform_model(copy.deepcopy(model), KEY, scheme, mean=norm[0], std=norm[1])
    with torch.no_grad():
        err = (transformed(normalise(enc, *norm)) - plain).abs().max().item()
        untouched = (model(normalise(enc, *norm)) - plain).abs().max().item()
    assert err < TOLERANCE
    assert untouched > max(100 * err, 10 * TOLERANCE)  # the key matters: untransformed, the check would fail


@pytest.fixture(scope="module", params=[SMALL, "vit_base_patch16_224"], ids=["micro", "vit_b16_geometry"])
def case(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, np.ndarray, dict]:
    """A model, images, and the original's logits on them per normalisation (computed once)."""
    # ViT-B/16 geometry (224 px, 16 px patches, width 768, 12 heads) with 1 of its 12 blocks:
    # the transform touches only the embeddings; the full depth is checked once below.
    m = make_model(request.param) if request.param == SMALL else make_model(request.param, depth=1)
    x = images(m)
    with torch.no_grad():
        plain = {norm: m(normalise(x, *norm)) for norm in (UNIFORM, IMAGENET)}
    return m, x, plain


@pytest.mark.parametrize("norm", [UNIFORM, IMAGENET], ids=["uniform", "imagenet"])
@pytest.mark.parametrize("scheme", ABSORBABLE)
def test_transformed_model_on_ciphertext_equals_original_on_plain(case, scheme: str, norm) -> None:
    model, x, plain = case
    check_exact(model, scheme, norm, x, plain[norm])


def test_full_vit_b16_is_exact_on_ciphertext() -> None:
    model = make_model("vit_base_patch16_224")
    x = images(model, n=1)
    with torch.no_grad():
        plain = model(normalise(x, *IMAGENET))
    check_exact(model, ALL_STEPS, IMAGENET, x, plain)


@pytest.mark.parametrize(
    "options",
    [
        dict(reg_tokens=2, no_embed_class=True),
        dict(reg_tokens=1),
        dict(class_token=False, global_pool="avg"),
        dict(class_token=False, global_pool="map"),
        dict(pre_norm=True),  # CLIP-style: no patch-embedding bias; the offset goes into pos_embed
        dict(pos_embed="none", class_token=False, global_pool="avg"),
    ],
    ids=["reg-no-embed-class", "reg", "gap", "map", "pre-norm", "no-pos-embed"],
)
def test_timm_vit_options(options: dict) -> None:
    model = make_model(SMALL, **options)
    x = images(model)
    with torch.no_grad():
        plain = model(normalise(x, *IMAGENET))
    check_exact(model, ALL_STEPS, IMAGENET, x, plain)
    if options.get("pre_norm"):
        assert model.patch_embed.proj.bias is None
        assert transform_model(copy.deepcopy(model), KEY, ALL_STEPS).state_dict().keys() == model.state_dict().keys()


def test_negpos_with_uniform_normalisation_flips_columns_only() -> None:
    """Hand arithmetic: with mean = std = 0.5, n' = 2(1 - v) - 1 = -n, so W' = -W on negated inputs, b' = b."""
    model = make_model(SMALL)
    emb = keyed_embedding(model, KEY, "negpos:pixel", mean=UNIFORM[0], std=UNIFORM[1])
    bits = KEY.choices("ppvit/v1/negpos:pixel/p=4/c=3", 48, 2).reshape(4, 4, 3).transpose(2, 0, 1)  # (C, p, p)
    sign = torch.from_numpy(1 - 2 * bits).float()
    torch.testing.assert_close(emb.weight, model.patch_embed.proj.weight * sign, rtol=0, atol=1e-7)
    torch.testing.assert_close(emb.bias, model.patch_embed.proj.bias, rtol=0, atol=1e-7)
    assert torch.equal(emb.pos_embed, model.pos_embed)


def test_keyed_embedding_leaves_the_model_alone() -> None:
    model = make_model(SMALL)
    before = copy.deepcopy(model.state_dict())
    emb = keyed_embedding(model, KEY, ALL_STEPS, mean=IMAGENET[0], std=IMAGENET[1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert emb.weight.shape == model.patch_embed.proj.weight.shape and emb.pos_embed.shape == model.pos_embed.shape


def test_inverse_undoes_the_transform() -> None:
    model = make_model(SMALL)
    x = images(model)
    enc = BlockCipher(KEY, ALL_STEPS, 4).encrypt(x)
    for_plain = transform_model(copy.deepcopy(model), KEY, ALL_STEPS, inverse=True)
    with torch.no_grad():  # the inverse model on plain images equals the original on encrypted ones
        assert (for_plain(normalise(x, *UNIFORM)) - model(normalise(enc, *UNIFORM))).abs().max() < TOLERANCE
    back = transform_model(transform_model(copy.deepcopy(model), KEY, ALL_STEPS), KEY, ALL_STEPS, inverse=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_block_map_of_shuffle_is_the_key_permutation() -> None:
    bmap = block_map(BlockCipher(KEY, "shuffle", 4).plan(16, 16, 3), 4)
    np.testing.assert_array_equal(bmap.pi, KEY.permutation("ppvit/v1/shuffle/p=4/c=3", 48))
    np.testing.assert_array_equal(bmap.sigma, np.arange(16))
    assert not bmap.inv.any()


def test_block_map_of_scramble_is_the_key_block_order() -> None:
    bmap = block_map(BlockCipher(KEY, "scramble", 4).plan(16, 8, 3), 4)
    np.testing.assert_array_equal(bmap.sigma, KEY.permutation("ppvit/v1/scramble/grid=4x2", 8))
    np.testing.assert_array_equal(bmap.pi, np.arange(48))


@pytest.mark.parametrize("scheme", ["rotate", "negpos", "channel", "shuffle+negpos"])
def test_block_map_refuses_per_block_plans(scheme: str) -> None:
    with pytest.raises(ValueError, match="different choices in different blocks"):
        block_map(BlockCipher(KEY, scheme, 4).plan(16, 16, 3), 4)


@pytest.mark.parametrize("scheme", ["rotate", "negpos", "channel", "shuffle+rotate", "channel:pixel+negpos"])
def test_per_block_schemes_are_refused(scheme: str) -> None:
    with pytest.raises(ValueError, match="cannot be absorbed"):
        transform_model(create_backbone(SMALL, num_classes=10), KEY, scheme)


def test_block_size_must_be_the_patch_size() -> None:
    with pytest.raises(ValueError, match="block size 8 differs from the model's patch size 4"):
        transform_model(create_backbone(SMALL, num_classes=10), KEY, "shuffle", block_size=8)


def test_unsupported_models_are_refused() -> None:
    with pytest.raises(ValueError, match="dynamic image size"):
        transform_model(create_backbone(SMALL, num_classes=10, dynamic_img_size=True), KEY, "shuffle")
    model = create_backbone(SMALL, num_classes=10, pre_norm=True)
    model.patch_embed.norm = torch.nn.LayerNorm(48)  # the offset could no longer move past the patch embedding
    with pytest.raises(ValueError, match="no bias"):
        transform_model(model, KEY, "negpos:pixel", mean=IMAGENET[0], std=IMAGENET[1])


def test_cli_transform_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(SMALL)
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    key = tmp_path / "k.key"
    KEY.save(key)
    out = tmp_path / "enc.safetensors"
    base = ["transform-model", "--model", SMALL, "--key", str(key), "--scheme", "shuffle+scramble"]
    args = [*base, "--weights", str(tmp_path / "plain.safetensors"), str(out)]
    assert cli.main(args) == 0
    transformed = create_backbone(SMALL, weights=out).eval()
    x = images(model)
    with torch.no_grad():
        enc = BlockCipher(KEY, "shuffle+scramble", 4).encrypt(x)
        assert (transformed(normalise(enc, *UNIFORM)) - model(normalise(x, *UNIFORM))).abs().max() < TOLERANCE
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["key_fingerprint"] == KEY.fingerprint and meta["scheme"] == "shuffle+scramble"
    assert (meta["block_size"], meta["input"], meta["mean"]) == ("4", "encrypted", "[0.5, 0.5, 0.5]")
    assert_no_key_material(out, KEY)

    written = out.read_bytes()
    assert cli.main(args) == 2  # refuses to overwrite
    assert out.read_bytes() == written
    assert cli.main([*args[:-1], "--scheme", "rotate", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()

    back = tmp_path / "back.safetensors"
    assert cli.main([*base, "--weights", str(out), "--inverse", str(back)]) == 0
    restored = load_file(str(back))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-6, msg=k)
    printed = capsys.readouterr()
    assert_no_key_material([out, back, printed.out, printed.err], KEY)


MIXED = ["mix", "lift", "scramble+mix", "negpos:pixel+shuffle+scramble+lift"]


def exact_ciphertext(x: np.ndarray, scheme: str, p: int) -> np.ndarray:
    """The real-valued ciphertext (no float16 rounding), from the mixing's matrix, outside BlockCipher."""
    cipher = BlockCipher(KEY, scheme, p)
    gathered = cipher.plan(*x.shape[1:]).apply_numpy(x).astype(np.float64)
    mixing = cipher.mixing()
    n, h, w, c = x.shape
    blocks = gathered.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * c)
    mixed = blocks @ mixing.matrix.T + 255 * mixing.offset  # u = A v + d, in pixel units
    return mixed.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)


@pytest.mark.parametrize("norm", [UNIFORM, IMAGENET], ids=["uniform", "imagenet"])
@pytest.mark.parametrize("scheme", MIXED)
def test_mixing_is_absorbed_exactly(case, scheme: str, norm) -> None:
    """Exact on the real-valued ciphertext; on the stored one (float16 for mix) within its rounding."""
    model, x, plain = case
    p = model.patch_embed.patch_size[0]
    transformed = transform_model(copy.deepcopy(model), KEY, scheme, mean=norm[0], std=norm[1])
    stored = BlockCipher(KEY, scheme, p).encrypt(x)
    big = p == 16  # ViT-B/16 geometry: 768 x 768 matrices, float32 logits of order 10
    if big and (norm == UNIFORM or scheme in ("lift", "scramble+mix")):
        pytest.skip("ViT-B/16 geometry: one float and one integer scheme suffice (seconds each)")
    with torch.no_grad():
        err = (transformed(normalise(exact_ciphertext(x, scheme, p).astype(np.float32), *norm)) - plain[norm]).abs()
        err_stored = (transformed(normalise(stored, *norm)) - plain[norm]).abs().max().item()
        untouched = (model(normalise(stored, *norm)) - plain[norm]).abs().max().item()
    assert err.max().item() < (1e-3 if big else TOLERANCE)
    assert err_stored < (1e-2 if scheme.endswith("mix") else 1e-3 if big else TOLERANCE)
    assert untouched > 30 * err_stored


def test_mixing_inverse_undoes_the_transform() -> None:
    model = make_model(SMALL)
    x = images(model)
    scheme = "negpos:pixel+shuffle+scramble+lift"
    enc = BlockCipher(KEY, scheme, 4).encrypt(x)
    for_plain = transform_model(copy.deepcopy(model), KEY, scheme, inverse=True)
    with torch.no_grad():
        assert (for_plain(normalise(x, *UNIFORM)) - model(normalise(enc, *UNIFORM))).abs().max() < TOLERANCE
