"""Encryption throughput at 224x224, against a per-block Python loop and a memory copy.

Everything is measured in this one run, side by side, and printed as images/s and ratios:

* ppvit numpy (NHWC uint8) and torch (NCHW uint8 and float32) encryption and decryption;
* a straightforward per-block loop doing the same pixel shuffling (one numpy fancy index
  per 16x16 block, the way block-wise encryption is usually written);
* a plain copy of the same bytes: the machine's memory limit for a pass over the data.

Usage: python benchmarks/bench_encrypt.py [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key

SIZE, BLOCK = 224, 16


def best_rate(fn: Callable[[], object], n_images: int, repeats: int) -> float:
    """Images per second of the fastest of ``repeats`` runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def per_block_loop(images: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The reference way: every block of every image flattened, permuted and written back."""
    out = np.empty_like(images)
    for n in range(images.shape[0]):
        for i in range(0, SIZE, BLOCK):
            for j in range(0, SIZE, BLOCK):
                block = images[n, i : i + BLOCK, j : j + BLOCK].reshape(-1)
                out[n, i : i + BLOCK, j : j + BLOCK] = block[perm].reshape(BLOCK, BLOCK, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="images per batch (256 = 38.5 MB, beyond the caches)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    key = Key(bytes(range(32)))
    images = np.random.default_rng(0).integers(0, 256, (args.batch, SIZE, SIZE, 3), dtype=np.uint8)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    nchw_f32 = nchw.float().div_(255)
    shuffle = BlockCipher(key, "shuffle", BLOCK)
    etc = BlockCipher(key, "shuffle+scramble+rotate+negpos+channel", BLOCK)
    perm = key.permutation(f"ppvit/v1/shuffle/p={BLOCK}/c=3", BLOCK * BLOCK * 3)
    loop_n = min(args.batch, 16)  # the loop is slow: time it on fewer images
    assert np.array_equal(per_block_loop(images[:loop_n], perm), shuffle.encrypt(images[:loop_n]))

    n, r = args.batch, args.repeats
    rates = {
        "memory copy (numpy)": best_rate(lambda: images.copy(), n, r),
        "per-block loop, shuffle": best_rate(lambda: per_block_loop(images[:loop_n], perm), loop_n, max(1, r // 2)),
        "ppvit numpy, shuffle": best_rate(lambda: shuffle.encrypt(images), n, r),
        "ppvit numpy, shuffle decrypt": best_rate(lambda: shuffle.decrypt(images), n, r),
        "ppvit numpy, full EtC": best_rate(lambda: etc.encrypt(images), n, r),
        "ppvit torch uint8, shuffle": best_rate(lambda: shuffle.encrypt(nchw), n, r),
        "ppvit torch float32, shuffle": best_rate(lambda: shuffle.encrypt(nchw_f32), n, r),
        "ppvit torch uint8, full EtC": best_rate(lambda: etc.encrypt(nchw), n, r),
    }
    copy_rate, loop_rate = rates["memory copy (numpy)"], rates["per-block loop, shuffle"]
    print(
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"batch {n} x {SIZE}x{SIZE}x3 uint8 ({images.nbytes / 1e6:.1f} MB), best of {r}"
    )
    print(f"{'':32} {'images/s':>10} {'MB/s':>8} {'x loop':>8} {'of copy':>8}")
    for name, rate in rates.items():
        mb = rate * SIZE * SIZE * 3 / 1e6
        print(f"{name:32} {rate:10.0f} {mb:8.0f} {rate / loop_rate:8.1f} {rate / copy_rate:8.1%}")
    best = max(rates["ppvit numpy, shuffle"], rates["ppvit torch uint8, shuffle"])
    print(f"targets (shuffle): >= 4x the loop: {best / loop_rate:.1f}x; >= 25% of copy: {best / copy_rate:.1%}")


if __name__ == "__main__":
    main()
