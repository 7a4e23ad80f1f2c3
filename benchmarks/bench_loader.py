"""Does loading ever starve training? Loader images/s against training images/s, in one run.

In memory: what `ppvit train` does per step on an in-memory dataset: gather a batch from the
uint8 array, then the batch pipeline (resize, encrypt with the key, normalise).

Streamed: `--images` random images at the model's input size, encrypted into WebDataset shards
by the library's writer (`ppvit encrypt --format wds --size SIDE`, in a temporary folder), then
read the way `ppvit train --data DIR --loader-workers W` reads them: `load_splits` gives the
`ShardStream`, its `batches` as `epoch_feed` calls them (one epoch, DataLoader start included),
then the batch pipeline (normalise only: the data arrive encrypted). Random noise makes the
largest PNGs, so the slowest decoding: real images feed faster.

The training step is `lora-pe` with bf16 autocast, as `ppvit train` runs it on a CPU. Loading and
training are timed apart, so with W > 0 on a small machine the workers would compete with
training for the same cores.

Usage: python benchmarks/bench_loader.py [--model NAME ...] [--images N] [--workers 0 1 2]
(the defaults are meant to take under 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import ArrayDataset, load_splits
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.pipeline import BatchPipeline, get_batch
from ppvit.models.backbones import create_backbone, input_size, normalization, patch_size
from ppvit.models.methods import apply_method, method_config

MODELS = {"vit_tiny_d6_patch4_32": (128, 4), "vit_base_patch16_224": (16, 2)}  # batch, timed training steps


def rate(fn, images_per_call: int, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return images_per_call * calls / (time.perf_counter() - t0)


def write_shards(root: Path, n: int, side: int, cipher: BlockCipher, shard_size: int) -> Path:
    """`ppvit encrypt --format wds` output of ``n`` random training images in 10 classes (and 10 test images)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 10)):
        for i in range(count):
            folder = root / "src" / split / str(i % 10)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:06d}.bmp")
    encrypt_collection(
        root / "src", root / "wds", cipher, size=side, fmt="wds", workers=2, progress=False, shard_size=shard_size
    )
    return root / "wds"


def feed_rate(data: Path, workers: int, batch: int, pipeline: BatchPipeline) -> float:
    """Images/s of one streamed training epoch, as `ppvit train` reads it (val_fraction 0.1, one process)."""
    stream = load_splits(data, 0.1, 0, loader_workers=workers).train
    steps = len(stream) // batch
    t0 = time.perf_counter()
    for images, _ in stream.batches(batch, 0, 1, shuffle=True, seed=1, steps=steps):
        pipeline(images, train=True)
    return steps * batch / (time.perf_counter() - t0)


def measure(model_name: str, batch: int, train_calls: int, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = apply_method(create_backbone(model_name, num_classes=10), method_config("lora-pe"))
    for blk in model.blocks:
        blk.attn.fused_attn = False
    side, p = input_size(model), patch_size(model)
    cipher = BlockCipher(Key.generate(), "shuffle", p)
    ds = ArrayDataset(
        np.random.default_rng(0).integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8),
        np.zeros(10_000, dtype=np.int64),
        tuple("0123456789"),
    )
    pipeline = BatchPipeline(side, *normalization(model), cipher, augment="crop-flip")
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
        f"{model_name} ({side}x{side}, batch {batch}): training {training:6.1f} img/s\n"
        f"  in memory (CIFAR 32x32 source):  loader {loader:8.0f} img/s, loader / training = {loader / training:6.1f}x"
    )
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        data = write_shards(Path(tmp), args.images, side, cipher, args.shard_size)
        shards = sorted(data.glob("train/shard-*.tar"))
        mb = sum(s.stat().st_size for s in shards) / 1e6
        print(
            f"  streamed: {args.images} encrypted {side}x{side} PNGs in {len(shards)} shards ({mb:.0f} MB), "
            f"written in {time.perf_counter() - t0:.0f} s"
        )
        streamed = BatchPipeline(side, *normalization(model), data_encrypted=True)
        for w in args.workers:
            feed = feed_rate(data, w, batch, streamed)
            ratio = feed / training
            print(f"  streamed, --loader-workers {w}:    feed   {feed:8.0f} img/s, feed / training   = {ratio:6.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", action="append", help=f"timm/ppvit model name, repeatable (default: {', '.join(MODELS)})"
    )
    ap.add_argument("--batch", type=int, help="batch size (default: 128 for the tiny model, 16 for the others)")
    ap.add_argument("--images", type=int, default=3000, help="streamed images written (default 3000)")
    ap.add_argument("--shard-size", type=int, default=250, help="images per shard (default 250)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="--loader-workers values (default 0 1 2)")
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    for name in args.model or list(MODELS):
        batch, calls = MODELS.get(name, (16, 2))
        measure(name, args.batch or batch, calls, args)
