"""Functions of the 0.2 data modules whose work is now a :class:`~ppvit.data.sources.Source` method, kept for
one release for the old paths (``ppvit.dataset_io``, ``ppvit.sources``, ``ppvit.data``; see ``ppvit._compat``).

New code calls :func:`ppvit.data.sources.open_source` and the source's methods; this module goes in 0.4.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ppvit.data.datasets import ArrayDataset, load_source_split
from ppvit.data.sources import Columns, ImageItem, Item, Select, open_source
from ppvit.data.sources.cifar10 import Cifar10Download
from ppvit.data.sources.encrypted_wds import EncryptedWds, labelled
from ppvit.data.sources.files import FilesSource
from ppvit.data.sources.wds import read_samples


def iter_image_bytes(src: str | os.PathLike, select: Select = None) -> Iterator[Item]:
    if not Path(src).exists():
        raise FileNotFoundError(f"source {src}: not found")
    return FilesSource(src).items(select)


def iter_images(src: str | os.PathLike, select: Select = None) -> Iterator[ImageItem]:
    return FilesSource(src).images(select)


Kind = str  # 0.2 named the kinds in a Literal; now a key of ``ppvit.data.sources.KINDS``


def source_kind(src: str | os.PathLike) -> Kind:
    return open_source(src).kind


def identity(src: str | os.PathLike, columns: Columns | None = None) -> str:
    return open_source(src, columns).identity()


def iter_source_bytes(src: str | os.PathLike, select: Select = None, columns: Columns | None = None) -> Iterator[Item]:
    return open_source(src, columns).items(select)


def iter_source_images(
    src: str | os.PathLike, select: Select = None, columns: Columns | None = None
) -> Iterator[ImageItem]:
    return open_source(src, columns).images(select)


def source_paths(src: str | os.PathLike, select: Select = None, columns: Columns | None = None) -> Iterator[str]:
    return open_source(src, columns).paths(select)


def load_encrypted_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = load_source_split(folder, split)
    return ds.images, ds.labels, list(ds.classes)


def wds_shard_files(folder: str | os.PathLike, split: str) -> list[Path]:
    return EncryptedWds(folder).shard_files(split)


def iter_wds_split(folder: str | os.PathLike, split: str) -> Iterator[tuple[bytes, int]]:
    source = EncryptedWds(folder)
    n_classes = len(source.split_classes(split))
    return (labelled(shard, sample, n_classes) for shard, sample in read_samples(source.shard_files(split)))


def download_cifar10() -> tuple[ArrayDataset, ArrayDataset]:
    source = Cifar10Download()
    return load_source_split(source, "train"), load_source_split(source, "test")
