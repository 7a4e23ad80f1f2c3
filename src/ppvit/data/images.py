"""From an image file to model-sized uint8 pixels: the one resize every path uses.

Training and ``eval`` (batches in :class:`~ppvit.data.pipeline.BatchPipeline`), ``predict``
and the serving client (files), ``encrypt --size``, previews and the audit all resize
here, so a file gets the same pixels, hence the same ciphertext and prediction, whichever
path carries it (before 0.3 the file paths used PIL's bicubic and training torch's, and
4.6% of shuffled CIFAR-10 test predictions depended on the path).

The kernel is torch's bicubic (Keys, a = -0.75, ``align_corners=False``), rounded and
clamped back to uint8: what every published ppvit result trained with, and it runs on
whole batches on any device. Where a side shrinks it is antialiased (torch's
``antialias=True``, PIL-like), since bicubic without a low-pass filter aliases a large
photo brought down to 112 or 224 pixels; CIFAR-10 at 32 pixels only grows, unaffected.

What a model's input went through is recorded as data, a :class:`Preprocess` (size, kernel,
mean, std), in the adapter's config and the encrypted dataset's manifest, and stated by the
server, so a client resizing otherwise is refused instead of answered wrongly; the
normalisation after it is :func:`normalize`, the one every path uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
    """uint8 NCHW -> float32 ``(v / 255 - mean_c) / std_c``: training, eval, predict and the server alike."""
    import torch

    x = images.float().div_(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NCHW images -> uint8 NCHW ``size x size`` (returned as given when already that size)."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    shrink = size < h or size < w
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=shrink)
    return x.round().clamp(0, 255).to(images.dtype)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """One HWC uint8 image through :func:`resize` (the file paths: predict, client, encrypt, previews)."""
    if image.shape[:2] == (size, size):
        return image
    import torch

    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # a copy: decoded arrays are read-only
    return resize(x, size)[0].permute(1, 2, 0).numpy()


def read_image(path: str | os.PathLike, size: int, resize: bool = True) -> np.ndarray:
    """An image file as (size, size, 3) uint8: plain images are resized, ciphertext must fit already."""
    from ppvit.data.sources.base import decode

    try:
        item = decode(str(path), Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"image {path}: cannot be read ({exc.strerror})") from None
    if item.error:
        raise ValueError(f"image {path}: {item.error}")
    image = np.asarray(item.image)
    if image.shape[:2] != (size, size) and not resize:
        raise ValueError(f"image {path}: is {image.shape[1]}x{image.shape[0]}, the model takes {size}x{size}")
    return resize_array(image, size).copy()


def image_files(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Files as given; a folder as the image files under it, sorted (hidden ones skipped)."""
    for path in map(Path, paths):
        if not path.is_dir():
            yield str(path)
            continue
        from ppvit.data.sources.base import IMAGE_SUFFIXES, is_image_path  # the sources' test of an image file

        found = sorted(p for p in path.rglob("*") if is_image_path(p.relative_to(path).as_posix()) and p.is_file())
        if not found:
            raise ValueError(f"folder {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        yield from map(str, found)
