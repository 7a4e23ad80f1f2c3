"""What keeps a GPU busy during a run: data resident on the device, fused AdamW, ``torch.compile``,
and step statistics kept on the device (one host sync every ``log_every_steps``, not per step).

Each choice is ``None`` = automatic in the config: on for a CUDA device, off on CPUs, where
each either costs more than it saves (compiling a short run) or changes nothing (a CPU
tensor is already where the data are). Every function takes the device, so the CUDA path is
the same code a CPU test runs with the choice forced on.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ppvit.data.datasets import ArrayDataset, DataSplits
from ppvit.data.pipeline import DeviceDataset

GPU_LOG_EVERY_STEPS = 50  # a host sync every 50 steps costs under 1% of a step's time at ViT-Ti batch sizes


def on_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def resident_splits(splits: DataSplits, device: torch.device, wanted: bool | None) -> DataSplits:
    """The in-memory splits copied once to ``device`` as uint8 (``wanted`` None: on CUDA), so a
    batch is one gather on the device instead of a host gather and a copy per step. Streamed
    splits (:class:`~ppvit.data.streaming.ShardStream`) stay as they are."""
    if not (on_cuda(device) if wanted is None else wanted):
        return splits

    def move(ds: object) -> object:
        return DeviceDataset.of(ds, device) if isinstance(ds, ArrayDataset) else ds

    return replace(splits, train=move(splits.train), val=move(splits.val), test=move(splits.test))


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA (torch's ``fused=True``; same update, fewer launches)."""
    return torch.optim.AdamW(groups, fused=True) if on_cuda(device) else torch.optim.AdamW(groups)


def maybe_compile(model: torch.nn.Module, device: torch.device, wanted: bool | None) -> torch.nn.Module:
    """``torch.compile(model)`` (``wanted`` None: on CUDA). It shares the model's parameters, so
    checkpoints and adapters are written from the model itself, under their plain names."""
    return torch.compile(model) if (on_cuda(device) if wanted is None else wanted) else model


def log_every(device: torch.device, wanted: int | None) -> int:
    """Steps between host syncs (``wanted`` None: every step on a CPU, where a sync is free)."""
    return wanted or (GPU_LOG_EVERY_STEPS if on_cuda(device) else 1)


class StepTotals:
    """Loss sum, correct predictions, images and whether any loss was not finite, summed on the
    device; :meth:`read` brings them to the host (the one sync)."""

    def __init__(self, device: torch.device, start: dict[str, float] | None = None) -> None:
        s = start or {}
        self.sums = torch.tensor(
            [s.get("loss", 0.0), s.get("correct", 0.0), s.get("n", 0.0), 0.0], dtype=torch.float64, device=device
        )

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(labels)
        step = torch.stack(
            [
                loss.detach().double() * n,
                (logits.detach().argmax(1) == labels).sum().double(),
                torch.full((), float(n), dtype=torch.float64, device=loss.device),
                (~torch.isfinite(loss.detach())).double(),
            ]
        )
        self.sums += step

    def read(self) -> tuple[dict[str, float], bool]:
        """(sums as the loop records them, whether every loss so far was finite)."""
        loss, correct, n, bad = self.sums.tolist()
        return {"loss": loss, "correct": correct, "n": n}, bad == 0 and math.isfinite(loss)
