"""Where ``ppvit encrypt`` and ``decrypt`` write: one sink per output format (png, npz, wds).

Every sink writes each file atomically and can tell, per image, whether a previous run wrote
it already (``claim``), so an interrupted run is continued, not restarted. Results arrive in
source order.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ppvit._io import _naming, atomic_write_bytes, commit_temp
from ppvit.data.manifest import MARKER, SHARD_SIZE
from ppvit.data.sources.base import class_of, optional, split_of
from ppvit.data.sources.encrypted_npz import read_npz, write_npz
from ppvit.data.sources.wds import count_samples

Inventory = tuple[dict[str, list[str]], dict[str, int]]  # (split -> sorted classes, split -> images)


class Sink(Protocol):
    def claim(self, rel: str) -> bool:
        """True when ``rel`` is written already (a previous run's): it is skipped."""

    def add(self, rel: str, arr: np.ndarray) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """The run failed: drop what is not finished (no temporary file left, nothing half-written committed)."""

    def inventory(self) -> Inventory:
        """What the output holds now, for the manifest."""


def open_sink(
    fmt: str, dst: Path, shard_size: int | None, classes: list[str], counts: dict[str, int], marker: str | None = None
) -> Sink:
    """The sink of output format ``fmt`` (``classes``: the label space of wds ``.cls`` members; ``counts``:
    images per split, that wds spreads over its shards; ``marker``: the :data:`~ppvit.data.manifest.MARKER`
    text every PNG carries, None for plain output)."""
    if fmt == "wds":
        return WdsSink(dst, shard_size or 0, classes, counts, marker)
    return NpzSink(dst) if fmt == "npz" else PngSink(dst, marker)


def output_name(fmt: str, rel: str) -> str:
    """What image ``rel`` of a source is written as in output format ``fmt``: two images of one name would be
    one output. An npz shard keeps each image's path as it is, but its decryption writes PNG files: its images
    are named as PNG output's, or a dataset encrypted whole could never be decrypted."""
    stem = Path(rel).with_suffix("").as_posix()
    return stem.replace(".", "_") if fmt == "wds" else f"{stem}.png"  # a wds sample's key has no dot


def png_bytes(arr: np.ndarray, marker: str | None = None) -> bytes:
    """A PNG of ``arr``; with ``marker``, a text chunk saying it is ppvit ciphertext (and under which key)."""
    info = None
    if marker is not None:
        info = PngInfo()
        info.add_text(MARKER, marker)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1, pnginfo=info)
    return buf.getvalue()


def _inventory(entries: Iterator[tuple[str, str]]) -> Inventory:
    """(split -> sorted classes, split -> count) from (split, class) pairs."""
    classes: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for split, cls in entries:
        classes.setdefault(split, set()).add(cls)
        counts[split] = counts.get(split, 0) + 1
    # sorted: the same manifest whatever order the file system lists the files in
    return {k: sorted(classes[k]) for k in sorted(classes)}, {k: counts[k] for k in sorted(counts)}


class PngSink:
    """One PNG per image, at the source's relative path with a .png suffix."""

    def __init__(self, dst: Path, marker: str | None = None) -> None:
        self.dst, self.marker = dst, marker

    def _path(self, rel: str) -> Path:
        return self.dst / output_name("png", rel)

    def claim(self, rel: str) -> bool:
        return self._path(rel).exists()

    def add(self, rel: str, arr: np.ndarray) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, png_bytes(arr, self.marker))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass  # each file is whole once written

    def inventory(self) -> Inventory:
        rels = (p.relative_to(self.dst).as_posix() for p in self.dst.rglob("*.png"))
        return _inventory((split_of(r), class_of(r)) for r in rels)


class _NumberedShards:
    """Outputs in numbered shards per split: the i-th image of a split (in source order) belongs to
    shard ``number(split, i)`` (here i // shard_size), so a rerun skips every image whose shard
    exists and rewrites only unfinished shards."""

    PATTERN = ""  # the shards' file names, as a glob

    def __init__(self, dst: Path, shard_size: int) -> None:
        self.dst, self.shard_size = dst, shard_size
        self.next_index: dict[str, int] = {}
        self.index: dict[str, int] = {}

    def _shard(self, split: str, number: int) -> Path:
        raise NotImplementedError

    def number(self, split: str, i: int) -> int:
        return i // self.shard_size

    def claim(self, rel: str) -> bool:
        """Give ``rel`` the next index of its split, hence its shard; True when that shard exists."""
        split = split_of(rel)
        i = self.next_index.get(split, 0)
        self.next_index[split] = i + 1
        self.index[rel] = self.number(split, i)
        return self._shard(split, self.index[rel]).exists()

    def _shards(self) -> list[Path]:
        return sorted(self.dst.rglob(self.PATTERN))


class NpzSink(_NumberedShards):
    """uint8 shards per split, ``<split>/shard-00000.npz`` (the layout of :mod:`ppvit.data.sources.encrypted_npz`)."""

    PATTERN = "shard-*.npz"

    def __init__(self, dst: Path) -> None:
        super().__init__(dst, SHARD_SIZE)
        self.buffers: dict[tuple[str, int], list[tuple[str, np.ndarray]]] = {}

    def _shard(self, split: str, number: int) -> Path:
        return self.dst / split / f"shard-{number:05d}.npz"

    def add(self, rel: str, arr: np.ndarray) -> None:
        split, shard = split_of(rel), self.index.pop(rel)
        for key in [k for k in self.buffers if k[0] == split and k[1] < shard]:
            self._flush(key)  # results arrive in source order: earlier shards are complete
        self.buffers.setdefault((split, shard), []).append((rel, arr))

    def _flush(self, key: tuple[str, int]) -> None:
        buf = self.buffers.pop(key)
        path = self._shard(*key)
        path.parent.mkdir(parents=True, exist_ok=True)
        rels = [r for r, _ in buf]
        classes = sorted({class_of(r) for r in rels})
        labels = np.array([classes.index(class_of(r)) for r in rels], dtype=np.int64)
        write_npz(path, np.stack([a for _, a in buf]), labels, classes, rels)

    def close(self) -> None:
        for key in list(self.buffers):
            self._flush(key)

    def abort(self) -> None:
        self.buffers.clear()  # a shard not written yet: the rerun makes it

    def inventory(self) -> Inventory:
        def entries() -> Iterator[tuple[str, str]]:
            for shard in self._shards():
                for p in read_npz(shard).paths:
                    yield split_of(p), class_of(p)

        return _inventory(entries())


class WdsSink(_NumberedShards):
    """WebDataset shards per split, ``<split>/shard-000000.tar`` (the layout of
    :mod:`ppvit.data.sources.encrypted_wds`), each image's PNG and ``.cls``.

    A source sorted by class (a folder tree) would give shards of one or two classes each, so the
    images are dealt round-robin: each block of up to ``SPREAD`` shards' worth of a split's images
    goes to its shards in turn (image i of a block to shard i mod the block's shard count), and a
    split of up to ``SPREAD`` shards has every class in every shard in proportion. Deterministic:
    the same source gives the same shards. A shard is written to a temporary name as its images
    arrive (never held in memory whole; at most ``SPREAD`` open per split) and renamed when its
    last image is in, so a rerun skips finished shards and rewrites the unfinished ones.
    """

    SPREAD = 64

    PATTERN = "shard-*.tar"

    def __init__(
        self, dst: Path, shard_size: int, classes: list[str], counts: dict[str, int], marker: str | None = None
    ) -> None:
        super().__init__(dst, shard_size)
        self.marker = marker
        self.lookup = {c: i for i, c in enumerate(classes)}
        self.counts = counts
        self.open: dict[tuple[str, int], tuple[Path, Path, Any, Any]] = {}  # (split, number) -> path, tmp, file, writer
        self.left: dict[tuple[str, int], int] = {}  # images a shard still waits for

    def _block(self, split: str, i: int) -> tuple[int, int, int]:
        """(first image, images, shards) of the block image ``i`` of ``split`` is in."""
        block = self.SPREAD * self.shard_size
        start = i // block * block
        n = min(block, max(self.counts.get(split, 0), i + 1) - start)
        return start, n, -(-n // self.shard_size)

    def number(self, split: str, i: int) -> int:
        start, n, shards = self._block(split, i)
        number = start // self.shard_size + (i - start) % shards
        if (split, number) not in self.left:
            self.left[split, number] = -(-(n - (number - start // self.shard_size)) // shards)
        return number

    def _shard(self, split: str, number: int) -> Path:
        return self.dst / split / f"shard-{number:06d}.tar"

    def add(self, rel: str, arr: np.ndarray) -> None:
        wds = optional("webdataset")
        split, number = split_of(rel), self.index.pop(rel)
        if (split, number) not in self.open:
            path = self._shard(split, number)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise _naming(exc, path) from None
            fh = os.fdopen(fd, "wb")
            self.open[split, number] = (path, Path(name), fh, wds.TarWriter(fh, encoder=False, mtime=0))
        key = output_name("wds", Path(rel).relative_to(split).as_posix() if split else rel)
        path, _, _, writer = self.open[split, number]
        try:
            label = str(self.lookup[class_of(rel)]).encode()
            writer.write({"__key__": key, "png": png_bytes(arr, self.marker), "cls": label})
        except OSError as exc:
            raise _naming(exc, path) from None
        self.left[split, number] -= 1
        if self.left[split, number] == 0:
            self._finish((split, number))

    def _finish(self, shard: tuple[str, int]) -> None:
        path, tmp, fh, writer = self.open[shard]
        try:
            writer.close()  # the tar stream; the file is ours to close
            fh.close()
        except OSError as exc:
            raise _naming(exc, path) from None  # abort() deletes it with the others
        del self.open[shard]
        commit_temp(tmp, path)

    def close(self) -> None:
        for shard in list(self.open):  # shards short of an image that failed
            self._finish(shard)

    def abort(self) -> None:
        """Close and delete every shard being written (a full disk: closing one fails too, and tarfile's stream
        then said so again as "Exception ignored" when collected)."""
        for _, tmp, fh, writer in self.open.values():
            for done in (writer.close, fh.close):
                with contextlib.suppress(Exception):
                    done()  # tarfile marks its stream closed before it writes: nothing left for its __del__
            tmp.unlink(missing_ok=True)
        self.open.clear()

    def inventory(self) -> Inventory:
        classes = sorted(self.lookup, key=self.lookup.__getitem__)
        counts: dict[str, int] = {}
        for shard in self._shards():
            split = shard.parent.relative_to(self.dst).as_posix().replace(".", "")
            counts[split] = counts.get(split, 0) + count_samples([shard])
        return {split: classes for split in sorted(counts)}, {k: counts[k] for k in sorted(counts)}
