"""Ciphertext-only key recovery (ppvit.attacks.ciphertext_only) on CIFAR-10: how many ciphertexts break a key.

For each number of ciphertexts N and each of ``--keys`` fresh keys (``Key.generate()``), the
attacker sees N encrypted CIFAR-10 test images (upscaled to ``--size`` by ``--resize``), recovers
the plan, and is scored on ``--held`` further images it never saw: the share of the plan exact,
exact up to the symmetries no ciphertext shows (block orientation; for scramble the image
mirror), up to colours as well, and PSNR/SSIM of the held-out images decrypted with it. Every
key gets its own images, a mix of all classes. Prints a markdown table (one row per N) and writes all runs to JSON.

Usage:
    python benchmarks/key_recovery_study.py --data PATH --size 224 --block 16 --scheme shuffle \\
        --n 5 10 20 --keys 5 [--resize bicubic] [--held 8] [--out study.json]

The attack is mostly 256x256 matrix products: on a busy machine, OPENBLAS_NUM_THREADS=1 made
it ten times faster here (thread contention); times in the table are wall-clock per key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ppvit._io import json_text
from ppvit.attacks.ciphertext_only import recover_plan
from ppvit.attacks.ciphertext_only_audit import score_recovery
from ppvit.attacks.metrics import upscale
from ppvit.crypto.ciphers import compile_plan
from ppvit.crypto.keys import Key
from ppvit.data.datasets import test_images


def run(images: np.ndarray, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One key: encrypt, attack with the first n images, score on the last ``args.held``."""
    key = Key.generate()
    truth = compile_plan(key, args.scheme, args.block, images.shape[1:])
    t0 = time.perf_counter()
    guess = recover_plan(truth.apply_numpy(images[:n]), args.scheme, args.block, seed=np.random.default_rng(args.seed))
    seconds = time.perf_counter() - t0
    score = score_recovery(guess, truth, args.scheme, args.block, images[-args.held :])
    return {"n": n, "key_fingerprint": key.fingerprint, "seconds": seconds, **dataclasses.asdict(score)}


def summary_row(runs: list[dict[str, Any]]) -> str:
    """Markdown row: how many keys fell exactly / up to symmetry / up to colours, and the means."""
    k = len(runs)

    def count(field: str) -> str:
        return f"{sum(r[field] == 1.0 for r in runs)}/{k}"

    psnr = [r["psnr_db_up_to_symmetry"] for r in runs]
    median_psnr = float(np.median(psnr))
    cells = [
        str(runs[0]["n"]),
        count("exact"),
        count("up_to_symmetry"),
        count("up_to_colours"),
        f"{np.mean([r['exact'] for r in runs]):.3f}",
        f"{np.mean([r['up_to_symmetry'] for r in runs]):.3f}",
        "inf" if math.isinf(median_psnr) else f"{median_psnr:.1f}",
        f"{np.nanmean([r['ssim'] for r in runs]):.3f}",
        f"{np.mean([r['seconds'] for r in runs]):.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| N | exact | up to symmetry | up to colours | mean exact | mean up to sym. | median PSNR up to sym. (dB) "
    "| mean SSIM | mean time (s) |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("PPVIT_CIFAR10"), help="CIFAR-10 copy (or $PPVIT_CIFAR10)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--scheme", default="shuffle", help="shuffle, scramble or shuffle+scramble")
    parser.add_argument("--n", type=int, nargs="+", default=[20], help="numbers of ciphertexts to try")
    parser.add_argument("--keys", type=int, default=5, help="fresh keys per N")
    parser.add_argument("--resize", default="bicubic", choices=["bicubic", "nearest"], help="32x32 -> size")
    parser.add_argument("--held", type=int, default=8, help="held-out images per key for PSNR/SSIM")
    parser.add_argument("--seed", type=int, default=0, help="the attack's random generator")
    parser.add_argument("--out", type=Path, default=Path("key_recovery_study.json"))
    args = parser.parse_args()

    per_key = max(args.n) + args.held
    pool = test_images(args.data, per_key * args.keys)  # class-balanced, a fixed choice, in class order
    pool = pool[np.random.default_rng(0).permutation(len(pool))]  # so that every key's images mix the classes
    how = "native" if pool.shape[1] == args.size else f"{args.resize} from {pool.shape[1]}x{pool.shape[2]}"
    setting = f"{args.scheme}, {args.size}x{args.size} ({how}), {args.block}x{args.block} blocks"
    print(f"ciphertext-only key recovery: {setting}, {args.keys} fresh keys per N, {args.held} held-out images")
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n in args.n:
        runs = []
        for k in range(args.keys):
            images = upscale(pool[k * per_key : (k + 1) * per_key], args.size, args.resize)
            runs.append(run(images, n, args))
        rows += runs
        print(summary_row(runs), flush=True)
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s")
    doc = {"setting": {k: str(v) for k, v in vars(args).items()}, "total_seconds": total, "runs": rows}
    args.out.write_text(json_text(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
