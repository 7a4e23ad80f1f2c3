"""What the patch embedding is fed under each scheme: the scale and spread of its input (issue 28).

`lift` trains 7-10 points below `mix` at the `cpu` preset (RESULTS.md). Both are absorbed
exactly (``W' = W A^-1``), so the difference is in what training from the plain weights has to
cope with: this prints, per scheme, the normalised input as the model sees it
(``(y / 255 - mean) / std`` with ViT-Ti's mean and std 0.5), its overall standard deviation
against plain images, the spread of the per-position standard deviations within a block, the
largest value, and the block map's condition number. One fresh key (or ``--key``), 256 CIFAR-10
test images at 112x112, 16x16 blocks.

Usage: PYTHONPATH=src python benchmarks/mixing_input_scale.py --data ../shared/datasets/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse

import numpy as np

from ppvit.attacks.metrics import upscale
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.crypto.mixing import block_mixing
from ppvit.data.datasets import test_images

SCHEMES = ("none", "shuffle", "mix", "lift")


def blocks(images: np.ndarray, p: int) -> np.ndarray:
    """(N, H, W, C) -> (N * blocks, p * p * C) in (row, column, channel) order."""
    n, h, w, c = images.shape
    return images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 copy (tar.gz or folder)")
    ap.add_argument("--key", help="key file (default: a fresh key)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=112)
    args = ap.parse_args()
    key = Key.load(args.key) if args.key else Key.generate()
    plain = upscale(test_images(args.data, args.images), args.size, "bicubic")
    base = None
    print(f"{args.images} test images at {args.size}x{args.size}, 16x16 blocks, key {key.fingerprint}")
    for scheme in SCHEMES:
        y = plain if scheme == "none" else BlockCipher(key, scheme, 16).encrypt(plain)
        v = (blocks(y, 16).astype(np.float64) / 255 - 0.5) / 0.5
        std = v.std()
        base = base or std
        per = v.std(0)
        mixing = block_mixing(key, scheme, 16, 3) if scheme in ("mix", "lift") else None
        sv = np.linalg.svd(mixing.matrix, compute_uv=False) if mixing else np.ones(1)
        print(
            f"{scheme:8s} input std {std:6.3f} ({std / base:4.1f}x plain)  per-position std "
            f"{per.min():.3f}-{per.max():.3f} ({per.max() / per.min():5.1f}x)  max |v| {np.abs(v).max():6.1f}  "
            f"block map condition {sv[0] / sv[-1]:.0f}"
        )


if __name__ == "__main__":
    main()
