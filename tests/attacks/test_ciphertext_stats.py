"""What ciphertexts show without a key: each scheme keeps what it should, and the jigsaw follows edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from attack_images import noise, smooth

from ppvit.attacks.ciphertext_stats import block_mean_image, ciphertext_stats, jigsaw_neighbours, source_blocks
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.transform import block_map


def test_ciphertext_statistics_show_what_each_scheme_keeps() -> None:
    key, imgs = Key.generate(), noise(2)
    shuffled = ciphertext_stats(imgs, BlockCipher(key, "shuffle", 4).encrypt(imgs), 4)
    assert shuffled["thumbnail_psnr_db"] == math.inf  # block brightness is kept exactly
    assert shuffled["block_histograms_kept"] == 1.0 and shuffled["blocks_verbatim"] == 0.0
    scrambled = ciphertext_stats(imgs, BlockCipher(key, "scramble", 4).encrypt(imgs), 4)
    assert scrambled["blocks_verbatim"] == 1.0 and scrambled["thumbnail_psnr_db"] < 30
    negated = ciphertext_stats(imgs, BlockCipher(key, "negpos", 4).encrypt(imgs), 4)
    assert negated["block_histograms_kept"] < 1.0


def test_block_means_by_hand() -> None:
    img = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    img[0, 0, 0] = [30, 60, 90]  # block 0 (2x2 pixels, 12 values) sums to 180: mean 15
    img[0, 3, 3, 0] = 7  # block 3: 7 / 12 = 0.58, rounds to 1
    means = block_mean_image(img, 2)[0]
    assert (means[:2, :2] == 15).all() and (means[2:, 2:] == 1).all()
    assert (means[:2, 2:] == 0).all() and (means[2:, :2] == 0).all()


@pytest.mark.parametrize("scheme", ["scramble", "shuffle+scramble"])
def test_source_blocks_agree_with_the_block_map(scheme: str) -> None:
    plan = BlockCipher(Key.generate(), scheme, 4).plan(32, 32)
    np.testing.assert_array_equal(source_blocks(plan, 4), block_map(plan, 4).sigma)


def test_jigsaw_reassembles_block_scrambling_from_ciphertexts_alone() -> None:
    cipher = BlockCipher(Key.generate(), "scramble", 4)
    sigma = source_blocks(cipher.plan(32, 32), 4)
    assert jigsaw_neighbours(cipher.encrypt(smooth(16)), 4, sigma) > 0.9
    assert jigsaw_neighbours(cipher.encrypt(noise(16)), 4, sigma) < 0.2  # no edges to follow
    rotated = BlockCipher(Key.generate(), "scramble+rotate", 4)
    sigma = source_blocks(rotated.plan(32, 32), 4)
    assert jigsaw_neighbours(rotated.encrypt(smooth(16)), 4, sigma) < 0.5  # edges moved
