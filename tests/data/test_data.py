"""The batch pipeline's order, ciphertext-safe augmentation, and the data splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import KEY

from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.augment import mix_batch, random_crop_flip
from ppvit.data.datasets import ArrayDataset, split_train_val, take_part
from ppvit.data.pipeline import BatchPipeline


def dataset(n: int = 200, classes: int = 4, size: int = 8, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    return ArrayDataset(images, labels.astype(np.int64), tuple(f"c{i}" for i in range(classes)))


def test_pipeline_order_is_resize_encrypt_normalise() -> None:
    ds = dataset(4, size=16)
    cipher = BlockCipher(KEY, "shuffle+scramble", 8)
    pipe = BatchPipeline(32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), cipher)
    got = pipe(torch.from_numpy(ds.images), train=False)
    # independent: resize (bicubic, rounded to uint8), encrypt the uint8 image, then normalise
    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    x = cipher.encrypt(x.round().clamp(0, 255).to(torch.uint8)).float() / 255
    want = (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_pipeline_refuses_plain_augmentation_on_ciphertext() -> None:
    with pytest.raises(ValueError, match="does not commute"):
        BatchPipeline(32, (0.5,) * 3, (0.5,) * 3, data_encrypted=True, augment="crop-flip")


def test_pipeline_refuses_resizing_ciphertext() -> None:
    pipe = BatchPipeline(32, (0.5,) * 3, (0.5,) * 3, data_encrypted=True)
    with pytest.raises(ValueError, match="resizing would destroy the ciphertext"):
        pipe(torch.zeros(1, 16, 16, 3, dtype=torch.uint8), train=False)


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


def test_val_split_is_stratified_disjoint_and_seeded() -> None:
    ds = dataset(400, classes=4)
    train, val = split_train_val(ds, 0.25, seed=1)
    assert len(val) == 100 and np.bincount(val.labels).tolist() == [25] * 4
    t_keys = {im.tobytes() for im in train.images}
    assert not t_keys & {im.tobytes() for im in val.images}
    assert len(t_keys) + len(val) == 400
    _, val2 = split_train_val(ds, 0.25, seed=1)
    np.testing.assert_array_equal(val.images, val2.images)


def test_parts_are_disjoint_and_cover_the_set() -> None:
    ds = dataset(300, classes=3)
    a, b = take_part(ds, "0/2"), take_part(ds, "1/2")
    ka, kb = {im.tobytes() for im in a.images}, {im.tobytes() for im in b.images}
    assert not ka & kb and len(ka | kb) == 300
    assert np.bincount(a.labels).tolist() == [50] * 3
    with pytest.raises(ValueError, match="i/k"):
        take_part(ds, "2/2")
