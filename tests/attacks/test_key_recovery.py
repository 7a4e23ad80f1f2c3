"""Ciphertext-only key recovery (ppvit.attacks.key_recovery): it recovers keys it should, and its score adds up."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from ppvit.attacks import key_recovery as kr
from ppvit.attacks.audit import plan_accuracy, upscale
from ppvit.crypto.ciphers import Plan, compile_plan
from ppvit.crypto.keys import Key


def smooth_images(n: int, size: int, seed: int, grain: float = 0.0) -> np.ndarray:
    """Photograph-like NHWC uint8 images: smooth brightness and colour fields upscaled 4x, red
    above blue on average, brighter and bluer at the top (what the colour prior expects), plus
    per-pixel brightness ``grain`` shared by the channels (native-resolution texture)."""
    rng = np.random.default_rng(seed)
    low = size // 4
    brightness = rng.normal(0, 40, (n, low, low, 1))
    colour = rng.normal(0, 15, (n, low, low, 3))
    height = np.linspace(1, -1, low)[None, :, None, None]
    base = np.array([135.0, 125.0, 105.0]) + height * np.array([10.0, 15.0, 30.0])
    coarse = np.clip(base + brightness + colour, 0, 255).astype(np.uint8)
    images = upscale(coarse, size, "bicubic").astype(np.float64)
    images += rng.normal(0, grain, (n, size, size, 1))
    return np.clip(images, 0, 255).round().astype(np.uint8)


def key(i: int) -> Key:
    """A fixed key: tests are deterministic (the study uses fresh keys)."""
    return Key(bytes([i]) * 32)


def identity_plan(shape: tuple[int, int, int]) -> Plan:
    return Plan(shape, np.arange(math.prod(shape)), None)


# -- the score --------------------------------------------------------------------------------------


def test_score_of_a_plan_with_two_values_swapped() -> None:
    secret = key(1)
    truth = compile_plan(secret, "shuffle", 4, (16, 16, 3))
    n = truth.index.size
    swapped = truth.index.copy()
    swapped[[5, 70]] = swapped[[70, 5]]
    guess = Plan(truth.shape, swapped, None)
    held = smooth_images(2, 16, seed=1)
    score = kr.score_recovery(guess, truth, "shuffle", 4, held)
    assert score.exact == pytest.approx((n - 2) / n)
    assert score.up_to_symmetry == pytest.approx((n - 2) / n)
    assert score.symmetry == "block identity"
    perfect = kr.score_recovery(truth, truth, "shuffle", 4, held)
    assert (perfect.exact, perfect.psnr_db, perfect.ssim) == (1.0, math.inf, pytest.approx(1.0))
    red_blue = kr.then(truth, np.arange(n).reshape(16, 16, 3)[..., ::-1].reshape(-1))  # decrypts to BGR
    score = kr.score_recovery(red_blue, truth, "shuffle", 4, held)
    assert (score.exact, score.up_to_symmetry, score.up_to_colours) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 1.0)


def test_score_forgives_block_orientation_and_for_scramble_the_mirror() -> None:
    shape, p = (16, 16, 3), 4
    secret = key(2)
    truth = compile_plan(secret, "shuffle", p, shape)
    turned = kr.then(truth, kr.block_symmetry_index(shape, p, 1))  # decrypts to every block turned 90 degrees
    held = smooth_images(2, 16, seed=2)
    score = kr.score_recovery(turned, truth, "shuffle", p, held)
    assert score.exact < 0.2
    assert (score.up_to_symmetry, score.symmetry) == (1.0, "block rot90")
    assert score.psnr_db < 40 and score.psnr_db_up_to_symmetry == math.inf

    truth = compile_plan(secret, "shuffle+scramble", p, shape)
    mirrored = kr.then(truth, kr.image_symmetry_index(shape, 4))
    score = kr.score_recovery(mirrored, truth, "shuffle+scramble", p, held)
    assert score.exact < 0.2
    assert (score.up_to_symmetry, score.symmetry) == (1.0, "image flip")
    # a mirror is no excuse for shuffle alone: blocks stay in place, so it shows at their edges
    assert kr.score_recovery(mirrored, truth, "shuffle", p, held).up_to_symmetry < 0.5


def test_symmetry_indexes_match_numpy() -> None:
    x = np.arange(2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    for k in range(8):
        want = np.rot90(x, k % 4, axes=(1, 2))
        want = want[:, :, ::-1] if k >= 4 else want
        got = x.reshape(2, -1)[:, kr.image_symmetry_index((8, 8, 3), k)].reshape(x.shape)
        np.testing.assert_array_equal(got, want)
        blocks = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        turned = np.rot90(blocks, k % 4, axes=(3, 4))
        turned = turned[:, :, :, :, ::-1] if k >= 4 else turned
        want = turned.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)
        got = x.reshape(2, -1)[:, kr.block_symmetry_index((8, 8, 3), 4, k)].reshape(x.shape)
        np.testing.assert_array_equal(got, want)


# -- the pieces -------------------------------------------------------------------------------------


def test_swap_gains_are_the_objective_change() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 9))
    a = a + a.T
    np.fill_diagonal(a, 0)
    cells = rng.permutation(9)
    template = rng.normal(size=(3, 3))
    b = kr._template_matrix(template, cells, 3)
    gains = kr._swap_gains(a, b)
    for i, j in [(0, 1), (2, 7), (8, 3)]:
        moved = cells.copy()
        moved[[i, j]] = moved[[j, i]]
        change = (a * kr._template_matrix(template, moved, 3)).sum() - (a * b).sum()
        assert gains[i, j] == pytest.approx(change)


def test_jigsaw_puts_scrambled_blocks_back() -> None:
    images = smooth_images(12, 48, seed=3)
    truth = compile_plan(key(3), "scramble", 8, images.shape[1:])
    sigma = kr.solve_jigsaw(truth.apply_numpy(images), 8)
    guess = kr.recover_plan(truth.apply_numpy(images), "scramble", 8)
    assert len(np.unique(sigma)) == 36
    assert plan_accuracy(guess, truth) == 1.0


# -- the attack -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "p", "n"), [(64, 8, 16), (32, 4, 24)])
def test_shuffle_is_recovered_exactly_from_ciphertexts_alone(size: int, p: int, n: int) -> None:
    images = smooth_images(n + 4, size, seed=size + p)
    truth = compile_plan(key(size + p), "shuffle", p, images.shape[1:])
    enc = truth.apply_numpy(images[:n])
    assert plan_accuracy(identity_plan(truth.shape), truth) < 0.1  # doing nothing does not pass
    guess = kr.recover_plan(enc, "shuffle", p, seed=np.random.default_rng(1))
    score = kr.score_recovery(guess, truth, "shuffle", p, images[n:])
    assert (score.exact, score.psnr_db) == (1.0, math.inf)


def test_native_texture_is_recovered_through_partial_correlations() -> None:
    """Grainy images (pixel-mates share detail that neighbours do not): the partial-correlation
    triangles find the pixels and their channels."""
    images = smooth_images(60, 32, seed=5, grain=12)
    p = 4
    truth = compile_plan(key(4), "shuffle", p, images.shape[1:])
    enc = truth.apply_numpy(images)
    flat = enc.reshape(60, 8, p, 8, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3).astype(np.float64)
    triplets = kr.triplets_by_partial_correlation(flat, 3)
    source = truth.index.reshape(32, 32, 3)[:p, :p].reshape(-1)  # block 0: value i comes from source[i]
    pixel, channel = (source[triplets] // 3), source[triplets] % 3
    assert (pixel == pixel[:, :1]).all()  # each row is one pixel
    assert all(len(np.unique(channel[:, j])) == 1 for j in range(3))  # each column one channel
    assert plan_accuracy(kr.recover_plan(enc, "shuffle", p), truth) == 1.0


def test_shuffle_scramble_is_recovered_up_to_the_mirror() -> None:
    images = smooth_images(44, 64, seed=7)
    scheme, p = "shuffle+scramble", 8
    truth = compile_plan(key(5), scheme, p, images.shape[1:])
    guess = kr.recover_plan(truth.apply_numpy(images[:40]), scheme, p)
    score = kr.score_recovery(guess, truth, scheme, p, images[40:])
    assert score.up_to_symmetry == 1.0
    assert score.symmetry in ("block identity", "image flip")
    assert score.psnr_db_up_to_symmetry == math.inf


def test_noise_gives_nothing_away() -> None:
    """Without image statistics there is nothing to recover: the guess is near chance."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    truth = compile_plan(key(6), "shuffle", 4, noise.shape[1:])
    guess = kr.recover_plan(truth.apply_numpy(noise), "shuffle", 4)
    assert kr.score_recovery(guess, truth, "shuffle", 4, noise[:2]).up_to_symmetry < 0.3


def test_refuses_what_it_cannot_attack() -> None:
    x = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not attack 'shuffle\\+negpos:pixel': negpos:pixel"):
        kr.recover_plan(x, "shuffle+negpos:pixel", 4)
    with pytest.raises(ValueError, match="rotate before shuffle"):
        kr.recover_plan(x, "rotate+shuffle", 4)  # per-block choices inside the shared permutation
    assert kr.unsupported("shuffle+scramble+rotate+negpos+channel") is None
    with pytest.raises(ValueError, match="not a multiple"):
        kr.recover_plan(x, "shuffle", 5)
    with pytest.raises(ValueError, match="uint8"):
        kr.recover_plan(x.astype(np.float32), "shuffle", 4)


# -- real images ------------------------------------------------------------------------------------


def cifar(n: int) -> np.ndarray:
    data = os.environ.get("PPVIT_CIFAR10")
    if not data:
        pytest.skip("PPVIT_CIFAR10 is not set")
    from ppvit.data.datasets import test_images

    return test_images(data, n)


@pytest.mark.data
def test_native_cifar_small_blocks() -> None:
    images = cifar(108)
    truth = compile_plan(key(7), "shuffle", 4, images.shape[1:])
    guess = kr.recover_plan(truth.apply_numpy(images[:100]), "shuffle", 4)
    assert kr.score_recovery(guess, truth, "shuffle", 4, images[100:]).exact == 1.0


@pytest.mark.slow
@pytest.mark.data
def test_upscaled_cifar_224_shuffle_from_20_ciphertexts() -> None:
    images = upscale(cifar(28), 224, "bicubic")
    truth = compile_plan(key(8), "shuffle", 16, images.shape[1:])
    guess = kr.recover_plan(truth.apply_numpy(images[:20]), "shuffle", 16)
    assert kr.score_recovery(guess, truth, "shuffle", 16, images[20:]).exact == 1.0
