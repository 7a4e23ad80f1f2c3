"""What every attack shares: the block layout of images, plans built from and scored against maps, image quality.

Each attack (known plaintext, weight matching, ciphertext only) guesses an encryption plan and is scored
the same way: the share of the plan it got right (:func:`plan_accuracy`) and how well held-out images
decrypt with it (:func:`psnr`, :func:`ssim`). Kept apart from the attacks so the numpy-only ones
(:mod:`ppvit.attacks.ciphertext_only`) import nothing heavy: scikit-image, scipy, torch and the cipher
module (which imports torch) are imported inside the functions that need them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ppvit.crypto.ciphers import Plan


def to_blocks(images: np.ndarray, p: int) -> np.ndarray:
    """NHWC -> (N, blocks, p*p*C), blocks row-major, values in (row, column, channel) order."""
    n, h, w, c = images.shape
    return images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * c)


def block_positions(shape: tuple[int, int, int], p: int) -> np.ndarray:
    """(blocks, p*p*C): the flat HWC index of each value of each block."""
    return to_blocks(np.arange(math.prod(shape)).reshape(1, *shape), p)[0]


def plan_from_maps(shape: tuple[int, int, int], p: int, sigma: np.ndarray, pi: np.ndarray, inv: np.ndarray) -> Plan:
    """The plan whose output block b takes block ``sigma[b]``, value i from value ``pi[b, i]``
    (negated where ``inv[b, i]``); ``pi`` and ``inv`` may be one row shared by all blocks."""
    from ppvit.crypto.ciphers import Plan

    pos = block_positions(shape, p)
    pi, inv = np.broadcast_to(pi, pos.shape), np.broadcast_to(inv, pos.shape)
    index = np.empty(pos.size, dtype=np.int64)
    index[pos] = pos[sigma[:, None], pi]
    invert = np.zeros(pos.size, dtype=bool)
    invert[pos] = inv
    return Plan(shape, index, invert if invert.any() else None)


def plan_accuracy(guess: Plan, truth: Plan) -> float:
    """Share of encrypted values whose source (and negation) the guess gets right."""
    ok = guess.index == truth.index
    gi = np.zeros_like(ok) if guess.invert is None else guess.invert
    ti = np.zeros_like(ok) if truth.invert is None else truth.invert
    return float((ok & (gi == ti)).mean())


def assign(score: np.ndarray) -> np.ndarray:
    """The permutation maximising the summed score: row i -> column ``out[i]``."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score, maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def psnr(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over whole arrays (inf when equal): scikit-image's."""
    if np.array_equal(a, b):
        return math.inf
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=max_value))


def ssim(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), per channel,
    over NHWC or HWC arrays at least 11 pixels wide: scikit-image's, averaged over the images."""
    from skimage.metrics import structural_similarity

    x = np.asarray(a, np.float64).reshape(-1, *a.shape[-3:])
    y = np.asarray(b, np.float64).reshape(-1, *b.shape[-3:])
    per_image = [
        structural_similarity(
            xi, yi, data_range=max_value, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for xi, yi in zip(x, y, strict=True)
    ]
    return float(np.mean(per_image))


def roughness(images: np.ndarray) -> float:
    """Mean absolute difference between side-by-side values of one channel (rows and columns) of NHWC
    images: low for photographs, high for scrambled pixels. What a layout is judged by, and the
    readability proxy of an attack scored without the key."""
    x = np.asarray(images, np.float64)
    return float((np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()) / 2)


def upscale(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """NHWC uint8 to ``size x size``: ``bicubic`` as every ppvit path resizes (:func:`ppvit.data.images.resize`),
    ``nearest`` by replicating pixels (flat regions, the known-plaintext attack's hard case)."""
    if images.shape[1:3] == (size, size):
        return images
    import torch

    from ppvit.data.images import resize

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if mode == "bicubic":
        x = resize(x, size)
    elif mode == "nearest":
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="nearest").to(torch.uint8)
    else:
        raise ValueError(f"resize mode {mode!r}: expected bicubic or nearest")
    return x.permute(0, 2, 3, 1).contiguous().numpy()
