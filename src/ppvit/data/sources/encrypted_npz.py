"""``ppvit encrypt --format npz`` output as a source, and ppvit's one npz layout.

The layout written (since 0.3), by the shards (``<split>/shard-00000.npz``, 1024 images each)
and by the decoded-image cache alike: ``images`` NHWC (uint8; a ``mix``/``lift`` dataset's ciphertext
float16 or int16/int32, the manifest's ``dtype``), ``labels`` int64 indices into
``classes`` (the class names), ``paths`` each image's relative path. Older files still read:
shards before 0.3 hold the class name of each image in ``classes`` and no ``labels``; cache
files before 0.3 have no ``paths``; a manifest naming the format ``npy`` means npz.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from numpy.lib.npyio import NpzFile

from ppvit._io import atomic_write
from ppvit.data.sources.base import EncryptedFolder, Item, Select, split_of


@dataclass
class NpzArrays:
    """One npz file read, whichever layout: images, labels indexing ``classes``, and the paths ([] if none)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]


def write_npz(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    paths: Sequence[str],
    mode: int | None = None,
) -> None:
    """Write the current layout atomically (``mode``: 0600 for the cache of plain images)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels, classes=np.array(classes), paths=np.array(paths))

    atomic_write(path, write, mode=mode)


def read_npz(path: Path, shard: bool = False) -> NpzArrays:
    """A shard's arrays; one that is cut, empty, not an npz or not of this layout is a one-line ValueError naming it
    (a truncated one was zipfile's traceback). ``shard``: an encrypted dataset's, whose every image needs its path
    (a cache file of 0.2 has none; a shard without them was skipped, exit 0)."""
    try:
        if not zipfile.is_zipfile(path):  # numpy reads any other file as a pickle: "contains pickled (object) data"
            raise ValueError("not an npz file (a zip archive), or one cut short")
        got = _read_npz(path)
        n = len(got.images)  # of (N, H, W, 3): one channel or four were a traceback or RGBA output
        if got.images.shape[3:] != (3,) or len(got.labels) != n or len(got.paths) not in (n if shard else 0, n):
            raise ValueError(
                f"{n} images of shape {got.images.shape[1:]}, {len(got.labels)} labels, {len(got.paths)} paths"
            )
        if n and not 0 <= got.labels.min() <= got.labels.max() < len(got.classes):
            raise ValueError(f"labels outside its {len(got.classes)} classes")
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"shard {path}: damaged ({type(exc).__name__}: {exc})") from None
    return got


def _read_npz(path: Path) -> NpzArrays:
    with np.load(path) as z:
        paths = [str(p) for p in _array(z, "paths").tolist()] if "paths" in z else []
        classes = [str(c) for c in _array(z, "classes").tolist()]
        if "labels" in z:
            return NpzArrays(_array(z, "images"), _array(z, "labels").astype(np.int64), classes, paths)
        names = sorted(set(classes))  # before 0.3: one class name per image
        lookup = {c: i for i, c in enumerate(names)}
        return NpzArrays(_array(z, "images"), np.array([lookup[c] for c in classes], dtype=np.int64), names, paths)


def _array(z: NpzFile, name: str) -> np.ndarray:
    """Array ``name`` of ``z``, once its header's shape and dtype are checked against the bytes its member holds: a
    header may declare any shape (one of (100000, 4096, 4096, 3) was numpy's 4.58 TiB allocation, a traceback)."""
    member = f"{name}.npy"
    with z.zip.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{member}: .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0")
        shape, _, dtype = read_header[version](fh)
        room = z.zip.getinfo(member).file_size - fh.tell()
    declared = math.prod(shape) * dtype.itemsize
    if declared > room:
        raise ValueError(f"{member} declares {shape} of {dtype}, {declared:,} bytes, and holds {room:,}")
    return z[name]


class EncryptedNpz(EncryptedFolder):
    """Shards per split with a manifest; items are the stored values (uint8 pixels, or a mixing's float16 or
    integer ciphertext: the manifest's dtype, checked per shard), shard by shard."""

    format: ClassVar[str] = "npz"
    kind: ClassVar[str] = "encrypted-npz"
    cache_decoded: ClassVar[bool] = False

    def shards(self) -> list[Path]:
        return sorted(Path(self.path).rglob("shard-*.npz"))

    def _items(self, select: Select = None) -> Iterator[Item]:
        seen: set[str] = set()
        for shard in self.shards():
            got = read_npz(shard, shard=True)
            if self.manifest is not None and got.images.dtype != self.manifest.dtype:
                raise ValueError(f"shard {shard}: holds {got.images.dtype}, its manifest says {self.manifest.dtype}")
            folder = shard.parent.relative_to(self.path).as_posix()
            for i, rel in enumerate(got.paths):
                # a path twice, or of another split than the shard's folder: one image decrypted over another (or
                # skipped as written already), exit 0; an unsafe path is named as one first
                if split_of(self._safe(rel)) != ("" if folder == "." else folder) or rel in seen:
                    why = "listed twice" if rel in seen else f"not of the split {folder!r} its shard is in"
                    raise ValueError(f"shard {shard}: {rel} is {why} (damaged)")
                seen.add(rel)
                if select is None or select(rel):
                    yield rel, got.images[i]
