"""The batch pipeline: its order (resize, encrypt, normalise) and what it refuses on ciphertext."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import KEY
from data_arrays import dataset

from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.pipeline import BatchPipeline


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


def test_one_normalisation_against_independent_arithmetic() -> None:
    """``normalize`` (training's pipeline and the server alike) is (v / 255 - mean_c) / std_c."""
    from ppvit.data.preprocess import normalize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 5, 7), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    want = (images / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    got = normalize(torch.from_numpy(images), mean, std)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    pipe = BatchPipeline(5, mean, std, data_encrypted=True)  # 5x5: no resize
    square = torch.from_numpy(images[..., :5]).permute(0, 2, 3, 1).contiguous()
    assert torch.equal(pipe(square, train=False), normalize(torch.from_numpy(images[..., :5]), mean, std))
    # per image and channel, (N, C): a server's pass of adapters with different recipes; one value: every channel
    means, stds = np.array([mean, (0.5, 0.5, 0.5)]), np.array([std, (0.5, 0.5, 0.5)])
    want = (images / 255.0 - means[:, :, None, None]) / stds[:, :, None, None]
    np.testing.assert_allclose(normalize(torch.from_numpy(images), means, stds).numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        normalize(torch.from_numpy(images), 0.5, 0.25).numpy(), (images / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-6
    )
