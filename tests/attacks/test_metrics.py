"""The shared measures of ppvit.attacks.metrics against hand arithmetic, and the one resize behind upscale."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attack_images import noise

from ppvit.attacks import metrics
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.transform import block_map


def test_psnr_and_ssim_against_hand_arithmetic() -> None:
    a = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 16  # one value off by 16: MSE = 256 / 768
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (256 / 768)))
    assert metrics.psnr(a, a) == math.inf
    x, y = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 50, np.uint8)
    c1 = (0.01 * 255) ** 2  # constant images: only the luminance term differs from 1
    assert metrics.ssim(x, y) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1))
    img = noise(1)
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + np.random.default_rng(5).normal(0, 30, img.shape), 0, 255).astype(np.uint8)
    assert 0 < metrics.ssim(img, noisy) < 0.95


def test_plan_from_maps_rebuilds_a_ciphers_plan() -> None:
    key = Key.generate()
    plan = BlockCipher(key, "scramble+shuffle+negpos:pixel", 4).plan(32, 32)
    bmap = block_map(plan, 4)
    rebuilt = metrics.plan_from_maps((32, 32, 3), 4, bmap.sigma, bmap.pi, bmap.inv)
    assert metrics.plan_accuracy(rebuilt, plan) == 1.0
    np.testing.assert_array_equal(rebuilt.index, plan.index)


def test_assign_maximises_the_summed_score() -> None:
    score = np.array([[5.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(metrics.assign(score), [1, 0, 2])  # 4 + 4 + 1, not greedy 5 + 0 + 1
    score = np.random.default_rng(0).normal(size=(6, 6))
    best = max(itertools.permutations(range(6)), key=lambda q: sum(score[i, j] for i, j in enumerate(q)))
    np.testing.assert_array_equal(metrics.assign(score), best)


def test_upscale_is_the_projects_resize_and_replication() -> None:
    """Bicubic growth gives the same pixels as before the one resize (a direct torch bicubic call),
    nearest replicates pixels, and shrinking is antialiased like every other path."""
    small = noise(3, 8)
    bicubic = metrics.upscale(small, 32, "bicubic")
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float()
    before = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).round().clamp(0, 255)
    np.testing.assert_array_equal(bicubic, before.to(torch.uint8).permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(metrics.upscale(small, 32, "nearest"), small.repeat(4, axis=1).repeat(4, axis=2))
    assert metrics.upscale(small, 8, "bicubic") is small
    big = noise(2, 64)
    # a 4x shrink averages about 4x4 independent values: their spread drops about 4-fold (74 -> 15);
    # unfiltered bicubic samples between 2x2 values and keeps most of it (74 -> 54)
    assert metrics.upscale(big, 16, "bicubic").std() < big.std() / 3
    with pytest.raises(ValueError, match="'area'"):
        metrics.upscale(small, 32, "area")
