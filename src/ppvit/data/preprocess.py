"""The input recipe as data: what a model's pixels went through before it saw them, and the one normalisation.

A :class:`Preprocess` (size, resize kernel, mean, std) is recorded in the adapter's config and the
encrypted dataset's manifest and stated by the server (``GET /v1/adapter``), so that a client
resizing otherwise is refused instead of answered wrongly. The resize is
:func:`ppvit.data.images.resize` (named :data:`KERNEL`); the normalisation after it is
:func:`normalize`, the one training, eval, predict and the server use. Torch-free to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


KERNEL = "torch-bicubic-antialias"
"""The name of :func:`resize`'s kernel, as recipes record it."""


@dataclass(frozen=True)
class Preprocess:
    """The input recipe: images resized to ``size`` with ``kernel``, then ``(v / 255 - mean) / std``
    per channel. ``mean``/``std`` None: not fixed yet (an encrypted dataset's manifest: the model
    trained on it decides them)."""

    size: int
    kernel: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, doc: Any, where: str) -> Preprocess:
        """A recipe read from JSON; ValueError naming ``where`` for anything malformed."""
        try:
            size, kernel, mean, std = doc["size"], doc["kernel"], doc["mean"], doc["std"]
            if type(size) is not int or size < 1 or not isinstance(kernel, str):
                raise TypeError
            stats = [None if v is None else tuple(float(x) for x in v) for v in (mean, std)]
            if (stats[0] is None) != (stats[1] is None) or (stats[0] is not None and len(stats[0]) != len(stats[1])):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: preprocess must be {{size, kernel, mean, std}}, not {str(doc)[:80]}") from None
        if stats[1] is not None and not all(x > 0 for x in stats[1]):
            raise ValueError(f"{where}: preprocess std {stats[1]} must be positive")
        return cls(size, kernel, stats[0], stats[1])

    def check(self, wanted: Preprocess, where: str) -> None:
        """ValueError naming the first field in which this recipe differs from ``wanted`` (unset fields agree)."""
        for name in ("size", "kernel", "mean", "std"):
            have, want = getattr(self, name), getattr(wanted, name)
            if have is not None and want is not None and have != want:
                raise ValueError(f"{where}: preprocess {name} is {have}, not {want}")

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "kernel": self.kernel,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
    """uint8 NCHW -> float32 ``(v / 255 - mean_c) / std_c``: training, eval, predict and the server alike.

    ``mean`` and ``std`` are per channel, (C,), or per image and channel, (N, C): a server's pass holds
    images of adapters with different recipes."""
    import torch

    x = images.float().div_(255)

    def per_channel(v: Sequence[float] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        return t.view(-1, t.shape[-1], 1, 1) if t.ndim == 2 else t.view(1, -1, 1, 1)

    return (x - per_channel(mean)) / per_channel(std)
