"""WebDataset shards as a source, and the one reader of WebDataset tar files in ppvit.

A source is a ``.tar`` file whose samples are ``KEY.jpg|png|...`` with ``KEY.cls`` (the label,
text), a folder of such shards, or a brace pattern (``shards/train-{000..009}.tar``). The split
is the shard's folder or name prefix (``train/``, ``train-000.tar``). Paths are
``split/class/SHARD_KEY.jpg``. A sample without an image (metadata only) is skipped; one
without a ``.cls``, whose ``.cls`` is not a label, or with two images (``.png`` and ``.jpg``), is a failed image.

:func:`read_samples` reads every WebDataset tar in ppvit (these sources, ``ppvit encrypt
--format wds`` output in memory and streamed): the ``webdataset`` library groups members into
samples (consecutive members sharing a key; the key is the name up to the first dot of its base
name), fed by :func:`members`, the one scan of tar headers (also counting samples), which names
a damaged or truncated shard and a duplicated key in one line. A member is read whole, so
one over ``MAX_MEMBER_BYTES`` (its header says its size before anything is read) stops the
read: memory is bounded per member, whatever a compressed shard would expand to; ppvit's own
encrypted shards (``compressed=False``) are read as plain tar only, as written. Needs the
``data`` extra (``webdataset``, which imports torch), imported when shards are read.
"""

from __future__ import annotations

import errno
import glob
import io
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from ppvit.data.sources.base import (
    MAX_IMAGE_BYTES,
    UNLABELLED,
    Item,
    Select,
    Source,
    has_images,
    label_name,
    optional,
    safe_name,
    split_from_path,
)

WDS_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")
MAX_MEMBER_BYTES = MAX_IMAGE_BYTES  # one member read into memory
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class WdsSource(Source):
    """Plain WebDataset shards of images and ``.cls`` labels."""

    kind: ClassVar[str] = "wds"

    @classmethod
    def claims(cls, path: str) -> bool:
        if is_pattern(path):
            return True
        p = Path(path)
        if p.is_dir():
            return bool(tar_files(p)) and not has_images(p)
        return p.is_file() and _looks_like_shard(p)

    def files(self) -> list[Path]:
        return wds_shards(self.path)

    def _items(self, select: Select = None) -> Iterator[Item]:
        text = str(self.path)
        root = Path(text) if not is_pattern(text) and Path(text).is_dir() else None
        for shard, sample in read_samples(wds_shards(text), compressed=True):
            key = sample["__key__"]
            cls_data = sample.get("cls")
            images = [e for e in WDS_IMAGE_EXTS if e in sample]
            if not images:
                continue  # a sample with no image (metadata only) is not an image
            image_ext = images[0]
            cls = None
            if isinstance(cls_data, bytes):
                try:
                    label = cls_data.decode("utf-8").strip()
                    value = int(label) if label.lstrip("-").isdigit() else label
                    cls = label_name(value, list(self.columns.classes) if self.columns.classes else None)
                except ValueError:  # not UTF-8, or past Python's 4300 digits (a line naming no shard)
                    cls = None
            split = split_from_path(shard, root, self.split_names())
            name = f"{shard.name.split('.')[0]}_{safe_name(key)}.{image_ext}"
            rel = "/".join(p for p in (split, cls or UNLABELLED, name) if p)
            if select is not None and not select(rel):
                continue
            why = None
            if len(images) > 1:  # the first was taken, the others dropped without a word
                why = f"{len(images)} images (.{', .'.join(images)}); a sample holds one"
            elif cls is None:
                why = "no .cls member" if cls_data is None else "its .cls is not a label"
            yield rel, sample[image_ext] if why is None else OSError(errno.ENODATA, f"sample {key} of {shard}: {why}")


def is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def tar_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tar") if not p.name.startswith("."))


def wds_shards(src: str | Path) -> list[Path]:
    """The shard files of a WebDataset source: a brace pattern, a folder of ``.tar`` files, or one file."""
    text = str(src)
    if is_pattern(text):
        braceexpand = optional("braceexpand").braceexpand
        files = [Path(f) for pattern in braceexpand(text) for f in (sorted(glob.glob(pattern)) or [pattern])]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]}: not found ({len(missing)} of the pattern's {len(files)})")
        return files
    path = Path(text)
    return tar_files(path) if path.is_dir() else [path]


def compression(shard: Path) -> str | None:
    """The compression a shard's first bytes announce (gzip, bzip2, xz, zstd), None for a plain tar."""
    with open(shard, "rb") as fh:
        head = fh.read(6)
    return next((name for magic, name in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


@contextmanager
def open_shard(shard: Path, compressed: bool = True) -> Iterator[tarfile.TarFile]:
    """An open shard (``compressed``: also gzip, bzip2 or xz; else a plain tar only, a compressed one
    refused by name); a damaged one (also found while reading it) is a one-line ValueError naming it."""
    try:
        if not compressed and (kind := compression(shard)) is not None:
            raise ValueError(f"shard {shard}: {kind}-compressed; encrypted shards are plain tar files, as written")
        with tarfile.open(shard, "r:*" if compressed else "r:") as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"shard {shard}: damaged ({exc.__class__.__name__}: {exc})") from None


def members(tar: tarfile.TarFile, shard: Path, limit: int | None = None) -> Iterator[tarfile.TarInfo]:
    """The headers of an open shard's members (the first ``limit``), in order; with no limit, a truncated
    shard raises ``tarfile.ReadError`` at its end (Python's tarfile ends quietly at a cut header)."""
    for i, member in enumerate(tar):
        if limit is not None and i >= limit:
            return
        yield member
    if isinstance(tar.fileobj, io.BufferedReader) and shard.stat().st_size - tar.offset < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated after {tar.offset} bytes, no end-of-archive blocks")


def count_samples(shards: Iterable[Path], keep: Callable[[str], bool] | None = None, most: int | None = None) -> int:
    """Samples with a ``.png`` member (whose key ``keep`` accepts) in ``shards``; reads tar headers only, and
    stops at ``most`` (whether a dataset holds a batch: a few headers, not every shard's)."""
    n = 0
    for shard in shards:
        with open_shard(shard, compressed=False) as tar:
            for m in members(tar, shard):
                name = m.name.removeprefix("./")
                n += m.isreg() and name.endswith(".png") and (keep is None or keep(name[: -len(".png")]))
                if most is not None and n >= most:
                    return n
    return n


def read_samples(shards: Iterable[Path], compressed: bool = False) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(shard, sample) per sample, a sample being ``{"__key__": KEY, EXT: bytes, ...}`` (extensions lower-cased);
    ``compressed``: compressed shards are read too (plain WebDataset sources), else refused.

    A member name, or a key, that appears twice in a shard (members of one sample not together)
    stops the read naming the shard: the samples would be ambiguous.
    """
    group_by_keys = optional("webdataset.tariterators").group_by_keys
    for shard in shards:
        keys: set[str] = set()
        for sample in group_by_keys(_files(shard, compressed)):
            key = sample["__key__"]
            if key in keys:
                raise ValueError(f"shard {shard}: sample {key} appears twice (its members are not together)")
            keys.add(key)
            yield shard, sample


def _files(shard: Path, compressed: bool) -> Iterator[dict[str, Any]]:
    """The shard's regular files as webdataset's file records (``fname``, ``data``, ``__url__``)."""
    names: set[str] = set()
    with open_shard(shard, compressed) as tar:
        for member in members(tar, shard):
            if not member.isreg():
                continue
            name = member.name.removeprefix("./")
            if name in names:
                raise ValueError(f"shard {shard}: {name} appears twice (a duplicated key)")
            if member.size > MAX_MEMBER_BYTES:
                raise ValueError(f"shard {shard}: {name[:80]} is {member.size} bytes, over {MAX_MEMBER_BYTES} a member")
            names.add(name)
            yield {"fname": name, "data": tar.extractfile(member).read(), "__url__": str(shard)}


def _looks_like_shard(path: Path) -> bool:
    """A tar archive whose first members include a ``.cls`` file: WebDataset, not an ImageFolder archive."""
    try:
        if not tarfile.is_tarfile(path):
            return False
        with open_shard(path) as tar:
            return any(m.name.endswith(".cls") for m in members(tar, path, limit=33))
    except (ValueError, OSError):
        return False  # reading it names the damage
