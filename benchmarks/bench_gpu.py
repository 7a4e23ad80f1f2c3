"""How much of the chip a run uses, from one run: the issue-30 ratios, side by side.

(a) the chip's measured bf16 matrix-multiply peak (TFLOP/s);
(b) the bare model's forward+backward (images/s on synthetic input already on the device, at the
    run's batch: the model's own ceiling), and that ceiling as a fraction of (a), from the FLOPs
    torch's FlopCounterMode counts in one step;
(c) the whole training pipeline (``train.session``'s own ``setup`` and ``train.loop``'s ``train_epoch``: uint8 images
    on the device, resize, encrypt, normalise, forward, backward, AdamW), its images/s and its
    ratio to (b) (target >= 0.8);
(d) lora-pe's step time over full fine-tuning's (target <= 0.75).

Each is measured eager and under ``torch.compile`` (on CUDA; ``--compile`` picks one), and printed and
saved as it lands, so a run cut short by its time limit keeps what it measured.

Targets are for ViT-Ti/16 at 224 on a GPU (the defaults). On a CPU it runs a tiny model as a
smoke test (``--tiny``): the figures then mean nothing, the arithmetic is checked.

Usage:
    python benchmarks/bench_gpu.py --data gpu-assets/cifar10-jpeg.tar.gz --json bench_gpu.json
    python benchmarks/bench_gpu.py --tiny            # CPU: vit_micro at 32 px on made-up images
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from ppvit.crypto.keys import Key
from ppvit.train.build import build_model
from ppvit.train.config import TrainConfig
from ppvit.train.fast import maybe_compile
from ppvit.train.loop import end_epoch, train_epoch
from ppvit.train.runtime import resolve_precision
from ppvit.train.session import setup

METHODS = ("full", "lora-pe")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: object, device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` (after two warm-up calls), the device drained before and after."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def matmul_peak(device: torch.device, n: int, reps: int) -> float:
    """bf16 n x n matrix multiply, TFLOP/s (2 n^3 per product)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, device, reps) / 1e12


def ceiling(cfg: TrainConfig, device: torch.device, steps: int) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the bare model's forward+backward on random input on the device."""
    model = build_model(cfg, 10).to(device).train()
    net = maybe_compile(model, device, cfg.backbone.compile)
    side, batch = model.patch_embed.img_size[0], cfg.optim.batch_size
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    bf16 = resolve_precision(cfg.optim.precision) == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:  # eager: the counter sees every matmul and attention
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return batch / timed(step, device, steps), counter.get_total_flops() / batch


def pipeline(cfg: TrainConfig, epochs: int) -> float:
    """Images/s of ``train_epoch`` (the run's own step loop; validation and checkpoints, in ``end_epoch``,
    not timed), best of ``epochs`` after one to warm up."""
    session = setup(cfg, resume=False)
    rates = []
    for epoch in range(epochs + 1):
        sums = train_epoch(session, epoch, None)
        end_epoch(session, epoch, sums)
        rates.append(sums["n"] / sums["seconds"])
    return max(rates[1:])


def toy_images(root: Path, n: int, side: int) -> Path:
    """An ImageFolder of ``n`` random images in 10 classes (the CPU smoke test's data)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 10)):
        for i in range(count):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--data", help="plain images to train on (default: made-up ones); CIFAR-10 on a GPU")
    p.add_argument("--train-subset", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs of the pipeline (after one warm-up epoch)")
    p.add_argument("--steps", type=int, default=30, help="timed steps of the bare model")
    p.add_argument("--matmul", type=int, default=8192, help="side of the peak's matrices")
    p.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default=None,
        help="torch.compile (default: both on CUDA, off on a CPU)",
    )
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: vit_micro at 32 px, batch 8, few steps")
    p.add_argument("--json", type=Path, help="also write the figures here (after each one: a run cut short keeps them)")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.img_size, a.batch, a.train_subset, a.epochs, a.steps, a.matmul = (
            "vit_micro_d2_patch4_32", 32, 8, 40, 1, 2, 256
        )  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = a.compile or ("both" if device.type == "cuda" else "off")
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[choice]
    with tempfile.TemporaryDirectory(prefix="ppvit-bench-gpu-") as tmp:
        key = Path(tmp) / "k.key"
        Key.generate().save(key)
        data = a.data or str(toy_images(Path(tmp) / "toy", max(a.train_subset, 2 * a.batch + 10), 32))
        base = TrainConfig.from_flat(
            model=a.model, img_size=a.img_size, pretrained=False, data=data, key=str(key), scheme="shuffle",
            batch_size=a.batch, train_subset=a.train_subset, test_subset=a.batch, val_fraction=0.1,
            epochs=a.epochs + 1, quiet=True,
        )  # fmt: skip
        out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        out |= {"model": a.model, "img_size": a.img_size, "batch": a.batch, "torch": torch.__version__}
        out["bf16_matmul_tflops"] = matmul_peak(device, a.matmul, 10)
        print(f"{out['device']}: {a.model} at {a.img_size} px, batch {a.batch}, torch {torch.__version__}")
        print(f"(a) bf16 matmul peak: {out['bf16_matmul_tflops']:.1f} TFLOP/s", flush=True)
        for compiled in modes:
            mode = "compiled" if compiled else "eager"
            figures = out.setdefault(mode, {})
            for method in METHODS:
                recipe = dict(lr=None, head_init=None, patch_embed_lr_scale=None)  # the method's own
                cfg = base.replace(method=method, out=str(Path(tmp) / mode / method), compile=compiled, **recipe)
                cfg = cfg.resolved()
                t0 = time.perf_counter()
                ips, flops = ceiling(cfg, device, a.steps)
                r = figures[method] = {
                    "ceiling_img_s": ips,
                    "gflop_per_img": flops / 1e9,
                    "ceiling_of_peak": ips * flops / 1e12 / out["bf16_matmul_tflops"],
                }
                print(
                    f"(b) {mode} {method}: bare fwd+bwd {ips:,.0f} img/s x {r['gflop_per_img']:.2f} GFLOP = "
                    f"{r['ceiling_of_peak']:.1%} of the peak ({time.perf_counter() - t0:.0f} s with warm-up)",
                    flush=True,
                )
                save(out, a.json)
                t0 = time.perf_counter()
                r["pipeline_img_s"] = pipeline(cfg, a.epochs)
                r["pipeline_of_ceiling"] = r["pipeline_img_s"] / ips
                print(
                    f"(c) {mode} {method}: whole pipeline {r['pipeline_img_s']:,.0f} img/s = "
                    f"{r['pipeline_of_ceiling']:.2f}x the ceiling (target >= 0.8; {time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                save(out, a.json)
            figures["lora_pe_step_over_full"] = figures["full"]["pipeline_img_s"] / figures["lora-pe"]["pipeline_img_s"]
            print(f"(d) {mode}: lora-pe step / full step {figures['lora_pe_step_over_full']:.2f}x (target <= 0.75)")
            save(out, a.json)
    return out


def save(out: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
