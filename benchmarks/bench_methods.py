"""Training step per method, a hand-written MeLo wrapper and PEFT's whole-qkv LoRA, and inference
(base, unmerged, merged), against this machine's matrix-multiply peak measured in the same run.

Why: ppvit's claim is efficiency (fewer trainable parameters, less memory, less time); the
figures say how much of it holds on a CPU, and whether our q/v LoRA costs more than the
obvious hand-written one. Each variant runs in its own process, so peak memory is its own.

Usage:
    python benchmarks/bench_methods.py --model vit_base_patch16_224 --batch 16 --steps 3
    python benchmarks/bench_methods.py --model vit_tiny_d6_patch4_32 --batch 128 --steps 12
    add --precision fp32 to train without autocast (faster on CPUs without AMX)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from ppvit.models.adapters import trainable_tensors
from ppvit.models.backbones import create_backbone, input_size
from ppvit.models.methods import apply_method, merge_adapters, method_config
from ppvit.train.runtime import peak_rss_mb

TRAIN_VARIANTS = ("full", "linear", "melo", "lora-pe", "melo-handwritten", "lora-qkv-peft")


class HandWrittenQVLora(nn.Module):
    """The straightforward MeLo layer: the frozen fused qkv, plus separate low-rank updates
    added to its q and v slices (A: d -> r, B: r -> d, B zero-initialised)."""

    def __init__(self, qkv: nn.Linear, r: int) -> None:
        super().__init__()
        d = qkv.in_features
        self.qkv, self.d = qkv, d
        self.a_q, self.b_q = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        self.a_v, self.b_v = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        for a, b in ((self.a_q, self.b_q), (self.a_v, self.b_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        d = self.d
        q = out[..., :d] + self.b_q(self.a_q(x))
        v = out[..., 2 * d :] + self.b_v(self.a_v(x))
        return torch.cat([q, out[..., d : 2 * d], v], dim=-1)


def build(variant: str, model_name: str) -> nn.Module:
    """The model of one variant, 10 classes, plain attention as `ppvit train` uses on CPUs."""
    torch.manual_seed(0)
    model = create_backbone(model_name, num_classes=10)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    if variant == "melo-handwritten":
        model.requires_grad_(False)
        for blk in model.blocks:
            blk.attn.qkv = HandWrittenQVLora(blk.attn.qkv, 4)
        model.get_classifier().requires_grad_(True)
        return model
    if variant == "lora-qkv-peft":
        return apply_method(model, method_config("melo", targets="qkv"))
    return apply_method(model, method_config(variant))


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Best GFLOP/s of an n x n matrix multiply (best of ``reps``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def training_step(model: nn.Module, batch: int, bf16: bool) -> tuple[Callable[[], None], torch.optim.AdamW]:
    """One AdamW step on a fixed random batch, as a closure, and its optimiser."""
    side = input_size(model)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def train_worker(variant: str, model_name: str, batch: int, steps: int, bf16: bool) -> dict:
    model = build(variant, model_name)
    step, opt = training_step(model, batch, bf16)
    params = opt.param_groups[0]["params"]
    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    opt_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    with tempfile.TemporaryDirectory() as tmp:
        save_file(trainable_tensors(model), f"{tmp}/a.safetensors")
        adapter_bytes = Path(f"{tmp}/a.safetensors").stat().st_size
    return {
        "variant": variant,
        "trainable": sum(p.numel() for p in params),
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "optimizer_bytes": opt_bytes,
        "adapter_bytes": adapter_bytes,
        "peak_rss_mb": peak_rss_mb(),  # VmHWM: ru_maxrss of an exec'd child is its parent's peak
    }


def qv_worker(model_name: str, batch: int, steps: int, bf16: bool) -> dict:
    """Step time of the three q/v LoRA variants in one process, interleaved, best of ``steps``.

    Why interleaved: steps vary by +-20% on this shared machine, more than the 5% to resolve.
    """
    variants = ("melo", "melo-handwritten", "lora-qkv-peft")
    steps_of = {v: training_step(build(v, model_name), batch, bf16)[0] for v in variants}
    best = dict.fromkeys(variants, math.inf)
    for v in variants:
        steps_of[v]()  # warm-up
    for _ in range(steps):
        for v in variants:
            t0 = time.perf_counter()
            steps_of[v]()
            best[v] = min(best[v], time.perf_counter() - t0)
    return best


@torch.no_grad()
def inference_worker(model_name: str, batch: int, steps: int, bf16: bool) -> dict:
    """Base vs lora-pe adapter unmerged vs merged, interleaved rounds, best of each."""
    base = build("full", model_name).eval()
    unmerged = build("lora-pe", model_name).eval()
    for name, p in unmerged.named_parameters():  # non-zero B so that merging changes weights
        if "lora_B" in name:
            p.normal_(0, 0.01)
    merged = merge_adapters(unmerged_copy(unmerged, model_name))
    side = input_size(base)
    x = torch.randn(batch, 3, side, side)
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = unmerged(x).float()
        err = (merged(x).float() - ref).abs().max().item()
        best = dict.fromkeys(models, math.inf)
        for _ in range(3):
            for name, m in models.items():
                m(x)
                t0 = time.perf_counter()
                for _ in range(steps):
                    m(x)
                best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    return {"images_per_s": {k: batch / v for k, v in best.items()}, "merged_max_abs_diff": err}


def unmerged_copy(model: nn.Module, model_name: str) -> nn.Module:
    """A second lora-pe model with ``model``'s weights (merging works in place)."""
    copy = build("lora-pe", model_name)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def run_child(args: argparse.Namespace, worker: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--model", args.model]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--precision", args.precision]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_d6_patch4_32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast or not")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    if args.worker == "inference":
        print(json.dumps(inference_worker(args.model, args.batch, args.steps, bf16)))
        return
    if args.worker == "qv":
        print(json.dumps(qv_worker(args.model, args.batch, args.steps, bf16)))
        return
    if args.worker:
        print(json.dumps(train_worker(args.worker, args.model, args.batch, args.steps, bf16)))
        return

    peaks = {"fp32": [matmul_peak(torch.float32)], "bf16": [matmul_peak(torch.bfloat16)]}
    rows = {v: run_child(args, v) for v in TRAIN_VARIANTS}
    inf = run_child(args, "inference")
    qv = run_child(args, "qv")
    peaks["fp32"].append(matmul_peak(torch.float32))
    peaks["bf16"].append(matmul_peak(torch.bfloat16))
    fp32_peak, bf16_peak = max(peaks["fp32"]), max(peaks["bf16"])
    print(f"{args.model}, batch {args.batch}, {args.precision}, {torch.get_num_threads()} threads")
    runs = ", ".join(f"{k} " + "/".join(f"{v:.0f}" for v in vs) for k, vs in peaks.items())
    print(f"matmul peak (2048^2, best of before/after): fp32 {fp32_peak:.0f}, bf16 {bf16_peak:.0f} GFLOP/s ({runs})")
    print(
        "| variant | trainable | img/s | step s | x full step | GFLOP/step | GFLOP/s | % bf16 peak | % fp32 peak "
        "| peak RSS MB | x full RSS | optimiser MB | adapter MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    full = rows["full"]
    for r in rows.values():
        rate = r["gflop_per_step"] / r["step_s"]
        print(
            f"| {r['variant']} | {r['trainable']:,} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['step_s'] / full['step_s']:.2f} | {r['gflop_per_step']:.1f} | {rate:.0f} | "
            f"{100 * rate / bf16_peak:.0f}% | {100 * rate / fp32_peak:.0f}% | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | "
            f"{r['optimizer_bytes'] / 2**20:.2f} | {r['adapter_bytes'] / 2**20:.2f} |"
        )
    melo, hand, peft_qkv = rows["melo"], rows["melo-handwritten"], rows["lora-qkv-peft"]
    print(
        f"interleaved in one process, best of {args.steps} steps: melo {qv['melo']:.3f} s, hand-written "
        f"{qv['melo-handwritten']:.3f} s, PEFT whole-qkv {qv['lora-qkv-peft']:.3f} s; melo / hand-written "
        f"{qv['melo'] / qv['melo-handwritten']:.3f}, melo / PEFT whole-qkv {qv['melo'] / qv['lora-qkv-peft']:.3f}"
    )
    print(
        f"melo peak RSS / hand-written: {melo['peak_rss_mb'] / hand['peak_rss_mb']:.3f}, "
        f"/ PEFT whole-qkv: {melo['peak_rss_mb'] / peft_qkv['peak_rss_mb']:.3f}"
    )
    ips = inf["images_per_s"]
    print(
        f"inference img/s: base {ips['base']:.1f}, unmerged {ips['unmerged']:.1f}, merged {ips['merged']:.1f}; "
        f"merged / base {ips['merged'] / ips['base']:.3f}, unmerged / base {ips['unmerged'] / ips['base']:.3f} "
        f"(merged vs unmerged max |diff|: {inf['merged_max_abs_diff']:.2e})"
    )


if __name__ == "__main__":
    main()
