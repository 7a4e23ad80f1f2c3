"""Does loading ever starve training? Loader images/s against training images/s, in one run.

The loader is what `ppvit train` does per step: gather a batch from the in-memory uint8
array, then the batch pipeline (resize, encrypt with the key, normalise). The training
step is `lora-pe` with bf16 autocast, as `ppvit train` runs it on a CPU.

Usage: python benchmarks/bench_loader.py   (about a minute)
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ppvit.backbones import create_backbone, input_size, normalization, patch_size
from ppvit.ciphers import BlockCipher
from ppvit.data import ArrayDataset, BatchPipeline, get_batch
from ppvit.keys import Key
from ppvit.methods import apply_method, method_config


def rate(fn, images_per_call: int, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return images_per_call * calls / (time.perf_counter() - t0)


def measure(model_name: str, batch: int, train_calls: int) -> None:
    torch.manual_seed(0)
    model = apply_method(create_backbone(model_name, num_classes=10), method_config("lora-pe"))
    for blk in model.blocks:
        blk.attn.fused_attn = False
    side, p = input_size(model), patch_size(model)
    ds = ArrayDataset(
        np.random.default_rng(0).integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8),
        np.zeros(10_000, dtype=np.int64),
        tuple("0123456789"),
    )
    pipeline = BatchPipeline(
        side, *normalization(model), BlockCipher(Key.generate(), "shuffle", p), augment="crop-flip"
    )
    order = torch.randperm(len(ds))
    state = {"i": 0}

    def load() -> torch.Tensor:
        i = state["i"] = (state["i"] + batch) % (len(ds) - batch)
        images, _ = get_batch(ds, order[i : i + batch], 0, 1)
        return pipeline(images, train=True)

    x, y = load(), torch.zeros(batch, dtype=torch.long)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    loader = rate(load, batch, max(5, 20 * train_calls))
    training = rate(step, batch, train_calls)
    print(
        f"{model_name} ({side}x{side}, CIFAR 32x32 source, batch {batch}): loader {loader:8.0f} img/s, "
        f"training {training:6.1f} img/s, loader / training = {loader / training:6.1f}x"
    )


if __name__ == "__main__":
    print(f"torch threads {torch.get_num_threads()}")
    measure("vit_tiny_d6_patch4_32", 128, 4)
    measure("vit_base_patch16_224", 16, 2)
