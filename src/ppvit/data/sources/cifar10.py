"""CIFAR-10 downloaded through torchvision: the source of ``--data cifar10`` (and of no ``--data`` with
$PPVIT_CIFAR10 unset), for online users. A local copy (ImageFolder folder or tar) is a files source.

The download goes once into the cache (``cache_dir()/torchvision``); its items are the pixels
themselves (``train/airplane/00000.png`` ...), in the dataset's order. torchvision is imported
when the data are first asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ppvit.data.cache import cache_dir
from ppvit.data.sources.base import Item, Select, Source, SplitNames

NAME = "cifar10"
CIFAR10_ENV = "PPVIT_CIFAR10"


def torchvision_split(root: Path, train: bool) -> Any:
    """torchvision's CIFAR10 dataset of one split, downloaded into ``root`` if missing (needs the network)."""
    from torchvision.datasets import CIFAR10

    return CIFAR10(str(root), train=train, download=True)


class Cifar10Download(Source):
    """CIFAR-10's train (50,000) and test (10,000) images, downloaded on first use."""

    kind: ClassVar[str] = "cifar10"
    cache_decoded: ClassVar[bool] = False

    def __init__(self, path: str | os.PathLike = NAME, columns: Any = None, splits: SplitNames | None = None) -> None:
        super().__init__(path, columns, splits)
        self._splits: dict[str, tuple[np.ndarray, list[int], list[str]]] | None = None

    @classmethod
    def claims(cls, path: str) -> bool:
        return path == NAME

    def files(self) -> list[Path]:
        return []  # nothing of the user's on disk

    def known_classes(self, split: str) -> list[str] | None:
        return self._data()[split][2]

    def _items(self, select: Select = None) -> Iterator[Item]:
        for split, (images, labels, classes) in self._data().items():
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                rel = f"{split}/{classes[label]}/{i:05d}.png"
                if select is None or select(rel):
                    yield rel, image

    def _data(self) -> dict[str, tuple[np.ndarray, list[int], list[str]]]:
        if self._splits is None:
            root = cache_dir() / "torchvision"
            try:
                parts = {"train": torchvision_split(root, True), "test": torchvision_split(root, False)}
            except Exception as exc:  # offline: URLError, socket errors, ...
                raise ValueError(
                    f"CIFAR-10 download failed ({exc.__class__.__name__}); offline, pass --data PATH or set "
                    f"{CIFAR10_ENV} to a local copy (ImageFolder folder or tar)"
                ) from None
            self._splits = {
                split: (np.asarray(d.data, dtype=np.uint8), list(d.targets), list(d.classes))
                for split, d in parts.items()
            }
        return self._splits
