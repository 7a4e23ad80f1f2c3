"""Training-step speed with timm's fused attention (torch SDPA) against its plain attention, on the CPU.

Why: the flash-attention CPU kernel's backward dominated the profile of a small ViT here.
Usage: python benchmarks/bench_attention.py [--model vit_tiny_d6_patch4_32] [--batch 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ppvit.models.backbones import create_backbone, input_size


def step_rate(model: torch.nn.Module, batch: int, bf16: bool, steps: int) -> float:
    """Images per second of full fine-tuning steps (forward, backward, AdamW)."""
    side = input_size(model)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_d6_patch4_32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_backbone(args.model, num_classes=10)
    print(f"{args.model}, batch {args.batch}, torch threads {torch.get_num_threads()}: images/s per training step")
    rows = {}
    for bf16 in (False, True):
        for fused in (True, False):
            for blk in model.blocks:
                blk.attn.fused_attn = fused
            rows[(bf16, fused)] = step_rate(model, args.batch, bf16, args.steps)
            print(
                f"  {'bf16' if bf16 else 'fp32'} {'fused' if fused else 'plain'} attention: {rows[(bf16, fused)]:7.1f}"
            )
    for bf16 in (False, True):
        print(f"  {'bf16' if bf16 else 'fp32'}: plain / fused = {rows[(bf16, False)] / rows[(bf16, True)]:.2f}x")
    print(f"  bf16 plain / fp32 fused (timm's default) = {rows[(True, False)] / rows[(False, True)]:.2f}x")


if __name__ == "__main__":
    main()
