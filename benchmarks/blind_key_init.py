"""What a server gains by breaking the key: blind key-init against the key holder's and plain lora-pe.

The server holds the training ciphertexts of the ``cpu`` preset (ImageNet ViT-Ti/16 at 112x112,
16x16 ``shuffle``). It recovers the plan from them alone (:func:`ppvit.attacks.ciphertext_only.recover_plan`),
folds the recovered plan into the pretrained patch embedding (:func:`ppvit.models.transform.plan_embedding`)
and fine-tunes ``lora-pe`` from that backbone: ``--key-init`` without ever being given the key.
Beside it, per seed, the key holder's ``--key-init`` run on the same data. With an exact recovery
the two must agree digit for digit (same backbone tensors, same seeds).

Usage:
    python benchmarks/blind_key_init.py --key runs/cpu/reproduce.key --out runs/blind [--seeds 0 1 2] [--n 20 4500]

Prints the recovery scores per number of ciphertexts and a markdown table; writes ``blind.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ppvit._io import json_text
from ppvit.attacks.ciphertext_only import recover_plan
from ppvit.attacks.ciphertext_only_audit import score_recovery
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import load_splits, resolve_data
from ppvit.experiments.cells import cell_config, run_cell
from ppvit.experiments.presets import PRESETS
from ppvit.models.backbones import create_backbone, input_size, patch_size
from ppvit.models.transform import install_embedding, plan_embedding
from ppvit.models.weights import WEIGHTS_ENV

SCHEME = "shuffle"


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """The training pipeline's resize (bicubic, rounded to uint8), NHWC."""
    out = []
    for start in range(0, len(images), 500):
        x = torch.from_numpy(images[start : start + 500]).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", required=True, help="the client's key file (used only to encrypt and to score)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default $PPVIT_CIFAR10)")
    ap.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, nargs="+", default=[20, 0], help="ciphertexts to attack with (0: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS["cpu"]
    data = str(resolve_data(args.data))
    key = Key.load(args.key)

    base = create_backbone(preset.model, weights=args.weights, img_size=preset.base.backbone.img_size)
    side, p = input_size(base), patch_size(base)
    d = preset.base.data
    splits = load_splits(data, d.val_fraction, 0, d.part, d.train_subset, d.test_subset)  # seed 0's split
    truth = BlockCipher(key, SCHEME, p).plan(side, side, 3)
    train_ct = truth.apply_numpy(resized(splits.train.images, side))  # what the server stores
    held_plain = resized(splits.test.images[:8], side)

    report: dict = {"key_fingerprint": key.fingerprint, "recovery": [], "cells": []}
    guess = None
    for n in args.n:
        n = n or len(train_ct)
        t0 = time.perf_counter()
        guess = recover_plan(train_ct[:n], SCHEME, p, seed=0)
        score = score_recovery(guess, truth, SCHEME, p, held_plain)
        row = {"n": n, "seconds": round(time.perf_counter() - t0, 1), **dataclasses.asdict(score)}
        report["recovery"].append(row)
        print(json.dumps(row), flush=True)

    # the server's backbone: the pretrained one with the last (largest-n) recovered plan folded in
    weights = out / "blind-backbone.safetensors"
    install_embedding(base, plan_embedding(base, guess))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))

    rows = {"blind key-init": {"weights": str(weights)}, "key holder (--key-init)": {"key_init": True}}
    for seed in args.seeds:
        for name, change in rows.items():
            common = {"data": data, "weights": args.weights, **change}
            tag = "blind" if "weights" in change else "holder"
            cfg = cell_config(
                preset, "lora-pe", SCHEME, seed, out / "cells" / f"{tag}-s{seed}", Path(args.key), **common
            )
            result = run_cell(cfg)
            report["cells"].append({"run": name, "seed": seed, "test_acc": result.test_acc})
            print(f"{name} seed {seed}: {100 * result.test_acc:.2f}", flush=True)
    (out / "blind.json").write_text(json_text(report))

    print(
        "\n| run | "
        + " | ".join(f"seed {s}" for s in args.seeds)
        + " | mean ± sd |\n|---|"
        + "---:|" * (len(args.seeds) + 1)
    )
    for name in rows:
        accs = [100 * c["test_acc"] for c in report["cells"] if c["run"] == name]
        sd = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {np.mean(accs):.2f} ± {sd:.2f} |")


if __name__ == "__main__":
    main()
