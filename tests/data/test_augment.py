"""Augmentation: crop-flip (plain only: it does not commute with encryption), mixup and block cutmix (they do)."""

from __future__ import annotations

import pytest
import torch
from conftest import KEY
from data_arrays import dataset

from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.augment import mix_batch, random_crop_flip


def test_crop_flip_is_a_shifted_or_mirrored_window() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, pad=2, generator=gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_crop_flip_does_not_commute_with_shuffling() -> None:
    """Why plain augmentation is refused on ciphertext: it gives a different image."""
    x = torch.from_numpy(dataset(8, size=16).images).permute(0, 3, 1, 2).contiguous()
    cipher = BlockCipher(KEY, "shuffle", 8)
    a = cipher.encrypt(random_crop_flip(x, 2, torch.Generator().manual_seed(1)))
    b = random_crop_flip(cipher.encrypt(x), 2, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0)])
def test_mixup_and_block_cutmix_commute_with_block_wise_encryption(mixup: float, cutmix: float) -> None:
    """Schemes that keep block positions (all but scramble): mixing ciphertexts = encrypting the mix."""
    x = torch.from_numpy(dataset(8, size=16).images).permute(0, 3, 1, 2).double() / 255
    y = torch.arange(8) % 4
    cipher = BlockCipher(KEY, "shuffle+rotate+negpos+channel", 4)
    mixed_plain, t1 = mix_batch(x, y, 4, mixup, cutmix, 4, torch.Generator().manual_seed(5))
    mixed_enc, t2 = mix_batch(cipher.encrypt(x), y, 4, mixup, cutmix, 4, torch.Generator().manual_seed(5))
    assert not torch.equal(mixed_plain, x)
    torch.testing.assert_close(cipher.encrypt(mixed_plain), mixed_enc, rtol=0, atol=1e-12)
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(t1.sum(1), torch.ones(8, dtype=t1.dtype))


def test_cutmix_target_share_equals_pasted_area() -> None:
    x = torch.zeros(6, 3, 16, 16)
    x[3:] = 1  # images 3..5 are ones: the pasted share is readable from pixel means
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    mixed, target = mix_batch(x, y, 2, 0.0, 1.0, 4, torch.Generator().manual_seed(0))
    ones_share = mixed.mean(dim=(1, 2, 3))
    torch.testing.assert_close(target[:, 1], ones_share)
