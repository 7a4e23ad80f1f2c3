"""Images and keys the attack tests share: noise, photograph-like smooth fields, fixed keys."""

from __future__ import annotations

import numpy as np

from ppvit.attacks.metrics import upscale
from ppvit.crypto.keys import Key


def noise(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Uniform noise: no structure for an attack to use beyond the values themselves."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def smooth(n: int, size: int = 32) -> np.ndarray:
    """Natural-image-like: random 4x4 colour fields upscaled bicubically (edges continue across blocks)."""
    return upscale(noise(n, 4, seed=3), size, "bicubic")


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


def blocky_photos(n: int, size: int, seed: int) -> np.ndarray:
    """A random 3x3 brightness and colour field upscaled bicubically, plus finer smooth detail:
    neighbouring blocks share brightness and gradients, as in photographs (the per-block
    negation is found from that; :func:`smooth_images` alone varies too fast between blocks)."""
    coarse = upscale(np.ascontiguousarray(smooth_images(n, 12, seed=seed)[:, ::4, ::4]), size, "bicubic")
    detail = smooth_images(n, size, seed=seed + 100).astype(np.float64)
    return np.clip(coarse + 0.3 * (detail - detail.mean()), 0, 255).round().astype(np.uint8)


def key(i: int) -> Key:
    """A fixed key: tests are deterministic (the study uses fresh keys)."""
    return Key(bytes([i]) * 32)
