"""Key-based model transformation: equal logits on encrypted inputs, refusals, the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ppvit import cli
from ppvit.backbones import create_backbone
from ppvit.ciphers import BlockCipher
from ppvit.keys import Key
from ppvit.model_transform import block_map, transform_model

KEY = Key(bytes(range(32)))
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
UNIFORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TOLERANCE = 1e-4  # max abs logit difference, float32


def normalise(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """The server's pipeline: uint8 -> [0, 1] -> per-channel normalisation."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module", params=["vit_micro_d2_patch4_32", "vit_base_patch16_224"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_backbone(request.param, num_classes=10).eval()
    with torch.no_grad():  # a trained model's position embeddings are far from timm's small init
        m.pos_embed.normal_(std=0.5)
    return m


@pytest.mark.parametrize("norm", [UNIFORM, IMAGENET], ids=["uniform", "imagenet"])
@pytest.mark.parametrize("scheme", ABSORBABLE)
def test_transformed_model_on_ciphertext_equals_original_on_plain(model, scheme: str, norm) -> None:
    side, p = model.patch_embed.img_size[0], model.patch_embed.patch_size[0]
    x = np.random.default_rng(1).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    enc = BlockCipher(KEY, scheme, p).encrypt(x)
    transformed = transform_model(copy.deepcopy(model), KEY, scheme, mean=norm[0], std=norm[1])
    with torch.no_grad():
        want = model(normalise(x, *norm))
        got = transformed(normalise(enc, *norm))
        untouched = model(normalise(enc, *norm))
    assert (got - want).abs().max() < TOLERANCE
    assert (untouched - want).abs().max() > 100 * (got - want).abs().max()  # the key really matters


@pytest.mark.parametrize("scheme", ["rotate", "negpos", "channel", "shuffle+rotate"])
def test_per_block_schemes_are_refused(scheme: str) -> None:
    m = create_backbone("vit_micro_d2_patch4_32", num_classes=10)
    with pytest.raises(ValueError, match="cannot be absorbed"):
        transform_model(m, KEY, scheme)


def test_block_size_must_be_the_patch_size() -> None:
    m = create_backbone("vit_micro_d2_patch4_32", num_classes=10)
    with pytest.raises(ValueError, match="block size 8 differs from the model's patch size 4"):
        transform_model(m, KEY, "shuffle", block_size=8)


def test_block_map_of_shuffle_is_the_key_permutation() -> None:
    plan = BlockCipher(KEY, "shuffle", 4).plan(16, 16, 3)
    bmap = block_map(plan, 4)
    np.testing.assert_array_equal(bmap.pi, KEY.permutation("ppvit/v1/shuffle/p=4/c=3", 48))
    np.testing.assert_array_equal(bmap.sigma, np.arange(16))
    assert not bmap.inv.any()


def test_cli_transform_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = create_backbone("vit_micro_d2_patch4_32", num_classes=10).eval()
    save_file(m.state_dict(), str(tmp_path / "plain.safetensors"))
    key = tmp_path / "k.key"
    KEY.save(key)
    args = [
        "transform-model",
        "--model",
        "vit_micro_d2_patch4_32",
        "--weights",
        str(tmp_path / "plain.safetensors"),
        "--key",
        str(key),
        "--scheme",
        "shuffle+scramble",
        str(tmp_path / "enc.safetensors"),
    ]
    assert cli.main(args) == 0
    t = create_backbone("vit_micro_d2_patch4_32", num_classes=10).eval()
    t.load_state_dict(load_file(str(tmp_path / "enc.safetensors")))
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        diff = t(normalise(BlockCipher(KEY, "shuffle+scramble", 4).encrypt(x), *UNIFORM)) - m(normalise(x, *UNIFORM))
    assert diff.abs().max() < TOLERANCE
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["key_fingerprint"] == KEY.fingerprint and meta["scheme"] == "shuffle+scramble"
    assert KEY.secret.hex().encode() not in (tmp_path / "enc.safetensors").read_bytes()
    assert cli.main(args) == 2  # refuses to overwrite
    assert cli.main([*args[:-2], "rotate", str(tmp_path / "x.safetensors")]) == 2
