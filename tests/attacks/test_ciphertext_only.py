"""Ciphertext-only key recovery (ppvit.attacks.ciphertext_only): it recovers the keys it should from images alone."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import pytest
from attack_images import blocky_photos, key, smooth_images

from ppvit.attacks import block_alignment, jigsaw, orientation, pixel_layout
from ppvit.attacks import ciphertext_only as co
from ppvit.attacks.ciphertext_only_audit import score_recovery
from ppvit.attacks.metrics import plan_accuracy, to_blocks, upscale
from ppvit.crypto.ciphers import Plan, compile_plan


def identity_plan(shape: tuple[int, int, int]) -> Plan:
    return Plan(shape, np.arange(math.prod(shape)), None)


# -- the pieces -------------------------------------------------------------------------------------


def test_symmetry_indexes_match_numpy() -> None:
    x = np.arange(2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    for k in range(8):
        want = np.rot90(x, k % 4, axes=(1, 2))
        want = want[:, :, ::-1] if k >= 4 else want
        got = x.reshape(2, -1)[:, orientation.image_symmetry_index((8, 8, 3), k)].reshape(x.shape)
        np.testing.assert_array_equal(got, want)
        blocks = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        turned = np.rot90(blocks, k % 4, axes=(3, 4))
        turned = turned[:, :, :, :, ::-1] if k >= 4 else turned
        want = turned.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)
        got = x.reshape(2, -1)[:, orientation.block_symmetry_index((8, 8, 3), 4, k)].reshape(x.shape)
        np.testing.assert_array_equal(got, want)


def test_swap_gains_are_the_objective_change() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 9))
    a = a + a.T
    np.fill_diagonal(a, 0)
    cells = rng.permutation(9)
    template = rng.normal(size=(3, 3))
    b = pixel_layout._template_matrix(template, cells, 3)
    gains = pixel_layout._swap_gains(a, b)
    for i, j in [(0, 1), (2, 7), (8, 3)]:
        moved = cells.copy()
        moved[[i, j]] = moved[[j, i]]
        change = (a * pixel_layout._template_matrix(template, moved, 3)).sum() - (a * b).sum()
        assert gains[i, j] == pytest.approx(change)


def test_jigsaw_puts_scrambled_blocks_back() -> None:
    images = smooth_images(12, 48, seed=3)
    truth = compile_plan(key(3), "scramble", 8, images.shape[1:])
    sigma = jigsaw.solve_jigsaw(truth.apply_numpy(images), 8)
    guess = co.recover_plan(truth.apply_numpy(images), "scramble", 8)
    assert len(np.unique(sigma)) == 36
    assert plan_accuracy(guess, truth) == 1.0


# -- the attack -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "p", "n"), [(64, 8, 16), (32, 4, 24)])
def test_shuffle_is_recovered_exactly_from_ciphertexts_alone(size: int, p: int, n: int) -> None:
    images = smooth_images(n + 4, size, seed=size + p)
    truth = compile_plan(key(size + p), "shuffle", p, images.shape[1:])
    enc = truth.apply_numpy(images[:n])
    assert plan_accuracy(identity_plan(truth.shape), truth) < 0.1  # doing nothing does not pass
    guess = co.recover_plan(enc, "shuffle", p, seed=np.random.default_rng(1))
    score = score_recovery(guess, truth, "shuffle", p, images[n:])
    assert (score.exact, score.psnr_db) == (1.0, math.inf)


def test_native_texture_is_recovered_through_partial_correlations() -> None:
    """Grainy images (pixel-mates share detail that neighbours do not): the partial-correlation
    triangles find the pixels and their channels."""
    images = smooth_images(60, 32, seed=5, grain=12)
    p = 4
    truth = compile_plan(key(4), "shuffle", p, images.shape[1:])
    enc = truth.apply_numpy(images)
    flat = enc.reshape(60, 8, p, 8, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3).astype(np.float64)
    triplets = co.triplets_by_partial_correlation(flat, 3)
    source = truth.index.reshape(32, 32, 3)[:p, :p].reshape(-1)  # block 0: value i comes from source[i]
    pixel, channel = (source[triplets] // 3), source[triplets] % 3
    assert (pixel == pixel[:, :1]).all()  # each row is one pixel
    assert all(len(np.unique(channel[:, j])) == 1 for j in range(3))  # each column one channel
    assert plan_accuracy(co.recover_plan(enc, "shuffle", p), truth) == 1.0


def test_noise_gives_nothing_away() -> None:
    """Without image statistics there is nothing to recover: the guess is near chance."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    truth = compile_plan(key(6), "shuffle", 4, noise.shape[1:])
    guess = co.recover_plan(truth.apply_numpy(noise), "shuffle", 4)
    assert score_recovery(guess, truth, "shuffle", 4, noise[:2]).up_to_symmetry < 0.3


def test_refuses_what_it_cannot_attack() -> None:
    x = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not attack 'shuffle\\+negpos:pixel': negpos:pixel"):
        co.recover_plan(x, "shuffle+negpos:pixel", 4)
    with pytest.raises(ValueError, match="rotate before shuffle"):
        co.recover_plan(x, "rotate+shuffle", 4)  # per-block choices inside the shared permutation
    assert co.unsupported("shuffle+scramble+rotate+negpos+channel") is None
    with pytest.raises(ValueError, match="not a multiple"):
        co.recover_plan(x, "shuffle", 5)
    with pytest.raises(ValueError, match="uint8"):
        co.recover_plan(x.astype(np.float32), "shuffle", 4)


# -- the per-block steps ------------------------------------------------------------------------------


def test_rotation_and_channel_order_per_block_are_recovered() -> None:
    """Each block position has its own rotation and channel order: pooled per position across
    images, the blocks are aligned to one map, then the shuffle falls as before."""
    images = smooth_images(20, 64, seed=64 + 8)
    scheme, p = "shuffle+rotate+channel", 8
    truth = compile_plan(key(72), scheme, p, images.shape[1:])
    assert plan_accuracy(compile_plan(key(72), "shuffle", p, images.shape[1:]), truth) < 0.2
    guess = co.recover_plan(truth.apply_numpy(images[:16]), scheme, p, seed=np.random.default_rng(1))
    score = score_recovery(guess, truth, scheme, p, images[16:])
    assert (score.exact, score.psnr_db) == (1.0, math.inf)


def test_negation_per_block_is_found_from_neighbouring_blocks() -> None:
    images = blocky_photos(40, 64, seed=3)
    p = 8
    truth = compile_plan(key(13), "shuffle+negpos", p, images.shape[1:])
    enc = truth.apply_numpy(images[:32])
    negated = truth.invert.reshape(8, p, 8, p, 3).all((1, 3, 4)).ravel()
    assert 0 < negated.sum() < len(negated)
    found = block_alignment.negated_blocks(to_blocks(enc, p))
    assert np.array_equal(found, negated) or np.array_equal(found, ~negated)  # relative to block 0
    noise = np.random.default_rng(1).integers(0, 256, enc.shape, dtype=np.uint8)
    found_in_noise = block_alignment.negated_blocks(to_blocks(noise ^ truth.invert.reshape(64, 64, 3) * 255, p))
    assert 0.25 < (found_in_noise == negated).mean() < 0.75


@pytest.mark.parametrize(
    ("photos", "scheme", "secret", "n"),
    [
        (lambda: smooth_images(44, 64, seed=7), "shuffle+scramble", 5, 40),
        (lambda: blocky_photos(40, 64, seed=5), "shuffle+scramble+rotate+negpos+channel", 16, 24),
    ],
    ids=["shuffle+scramble", "full-etc"],
)
def test_scrambled_schemes_are_recovered_up_to_the_mirror(
    photos: Callable[[], np.ndarray], scheme: str, secret: int, n: int
) -> None:
    """Blocks moved too: the jigsaw puts them back, right up to the image's left-right mirror."""
    images, p = photos(), 8
    truth = compile_plan(key(secret), scheme, p, images.shape[1:])
    guess = co.recover_plan(truth.apply_numpy(images[:n]), scheme, p)
    score = score_recovery(guess, truth, scheme, p, images[n:])
    assert score.up_to_symmetry == 1.0 and score.symmetry in ("block identity", "image flip")
    assert score.psnr_db_up_to_symmetry == math.inf


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
    guess = co.recover_plan(truth.apply_numpy(images[:100]), "shuffle", 4)
    assert score_recovery(guess, truth, "shuffle", 4, images[100:]).exact == 1.0


@pytest.mark.slow
@pytest.mark.data
def test_upscaled_cifar_224_shuffle_from_20_ciphertexts() -> None:
    images = upscale(cifar(28), 224, "bicubic")
    truth = compile_plan(key(8), "shuffle", 16, images.shape[1:])
    guess = co.recover_plan(truth.apply_numpy(images[:20]), "shuffle", 16)
    assert score_recovery(guess, truth, "shuffle", 16, images[20:]).exact == 1.0
