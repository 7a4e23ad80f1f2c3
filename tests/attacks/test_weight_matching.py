"""Weight matching recovers a key-transformed model's permutation, and nothing from an unrelated model;
the embedding attack decrypts a mixing with the key holder's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_images import smooth_images
from conftest import SMALL
from timm.models.vision_transformer import VisionTransformer

from ppvit.attacks.block_mixing import BlockStats
from ppvit.attacks.metrics import psnr
from ppvit.attacks.weight_matching import (
    RIDGES,
    MapScore,
    choose_ridge,
    embedding_decryptor,
    embedding_leakage_transformed,
    weight_leakage_transformed,
    weight_matching_attack,
)
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.backbones import create_backbone
from ppvit.models.transform import block_map, transform_model


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+scramble", "channel:pixel+scramble"])
def test_weight_matching_recovers_everything_from_a_key_transformed_model(scheme: str) -> None:
    key = Key.generate()
    score = weight_leakage_transformed(SMALL, key, scheme)
    assert score.pixel_permutation == 1.0
    assert score.block_permutation in (None, 1.0)
    assert (score.block_permutation is None) == ("scramble" not in scheme)


def test_weight_matching_finds_nothing_in_an_unrelated_embedding() -> None:
    torch.manual_seed(0)
    public = create_backbone(SMALL, num_classes=0)
    torch.manual_seed(1)
    other = create_backbone(SMALL, num_classes=0)
    key = Key.generate()
    truth = block_map(BlockCipher(key, "shuffle", 4).plan(32, 32), 4)
    transform_model(other, key, "shuffle")
    guess = weight_matching_attack(public.state_dict(), other.state_dict())
    assert MapScore.of(guess, truth).pixel_permutation < 0.2  # 48 columns: chance is about 1/48


PRIOR, HELD = BlockStats(4).add(smooth_images(200, 32, seed=1)), smooth_images(8, 32, seed=2)


def _public(width: int | None = None) -> torch.nn.Module:
    """SMALL (48 rows: as wide as its 4x4x3 blocks), or a ViT as SMALL but ``width`` rows wide."""
    torch.manual_seed(0)
    if width is None:
        return create_backbone(SMALL, num_classes=0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=width, depth=1, num_heads=2, num_classes=0)


@pytest.mark.parametrize(
    "scheme, floor_db",
    [
        ("mix", 40.0),  # exact but for the float16 ciphertext's rounding and the ridge chosen blind (52 dB)
        ("lift", 40.0),  # integers
        ("shuffle", 40.0),  # a permutation is a within-block linear map too
        ("scramble+mix", 40.0),  # blocks put back by the position rows
    ],
)
def test_a_model_as_wide_as_a_block_decrypts_by_its_embedding(scheme: str, floor_db: float) -> None:
    score, guess = embedding_leakage_transformed(_public(), Key.generate(), scheme, PRIOR, HELD)
    assert score["held_out_psnr_db"] > floor_db
    assert score["held_out_psnr_db"] == psnr(HELD, guess)
    assert score["held_out_ssim"] > 0.99


def test_blocks_left_where_the_ciphertext_has_them_do_not_decrypt() -> None:
    """The mutation of the test above: without the position rows' block order, scramble+mix stays scrambled."""
    key = Key.generate()
    server = transform_model(_public(), key, "scramble+mix", 4)
    guess = embedding_decryptor(_public(), server, PRIOR).decrypt(BlockCipher(key, "scramble+mix", 4).encrypt(HELD), 4)
    assert psnr(HELD, guess) < 20.0


def test_a_narrower_model_gives_less_than_the_key_and_more_than_the_prior() -> None:
    """12 rows see a quarter of a block's 48 values: between the prior's mean block and the exact image."""
    key = Key.generate()
    narrow, _ = embedding_leakage_transformed(_public(12), key, "mix", PRIOR, HELD)
    wide, _ = embedding_leakage_transformed(_public(), key, "mix", PRIOR, HELD)
    mean_block = np.broadcast_to(PRIOR.mean.reshape(4, 4, 3).mean((0, 1)).round().astype(np.uint8), HELD.shape)
    assert psnr(HELD, mean_block) + 5.0 < narrow["held_out_psnr_db"] < wide["held_out_psnr_db"] - 5.0


def test_the_model_of_another_key_decrypts_nothing() -> None:
    public, key, other = _public(), Key.generate(), Key.generate()
    server = transform_model(_public(), other, "mix", 4)
    guess = embedding_decryptor(public, server, PRIOR).decrypt(BlockCipher(key, "mix", 4).encrypt(HELD), 4)
    assert psnr(HELD, guess) < 15.0


def test_the_ridge_chosen_without_the_images_copes_with_a_drifted_model() -> None:
    """A key holder's model that training moved (here: noise on its patch embedding) decrypts to noise under
    the smallest ridge; the one choose_ridge picks by the prior's roughness, blind, does far better.

    Over 30 random keys the blind choice gained at least 5.7 dB over the smallest ridge (9.4 on average) and came
    within 1 dB of the best ridge chosen with the images in 27, 3.0 dB short at worst (this test asserted 1 dB
    with a random key and failed in a fresh clone). One fixed key here: 34.7 dB chosen (1e-3), 26.9 at the
    smallest ridge, 37.2 at the best (3e-2)."""
    key, public = Key(bytes(range(32))), _public()
    server = transform_model(_public(), key, "mix", 4)
    with torch.no_grad():
        torch.manual_seed(3)
        weight = server.patch_embed.proj.weight
        weight += 0.1 * weight.std() * torch.randn_like(weight)
    cipher = BlockCipher(key, "mix", 4).encrypt(HELD)
    ridge = choose_ridge(public, server, PRIOR, cipher)
    by_ridge = {r: psnr(HELD, embedding_decryptor(public, server, PRIOR, r).decrypt(cipher, 4)) for r in RIDGES}
    assert by_ridge[ridge] > by_ridge[RIDGES[0]] + 5.0
    assert by_ridge[ridge] > max(by_ridge.values()) - 3.5  # near the best ridge chosen with the images
