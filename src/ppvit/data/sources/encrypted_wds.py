"""``ppvit encrypt --format wds`` output as a source: ``<split>/shard-000000.tar`` of ``KEY.png`` + ``KEY.cls``.

``KEY`` is the image's path below its split without suffix (``cat/00000012``); ``.cls`` is the
class's index in the manifest's class list of the split. Training streams these shards
(:class:`ppvit.data.streaming.ShardStream`); the items here (``split/KEY.png``, the PNG bytes)
load them into memory or feed them to another encrypt. Both read them through
:func:`ppvit.data.sources.wds.read_samples` and check each sample with :func:`labelled`.
"""

from __future__ import annotations

import io
import posixpath
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ppvit.data.sources.base import EncryptedFolder, Item, Select, class_of
from ppvit.data.sources.wds import members, open_shard, read_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLS_BYTES = 16  # a .cls member: a class index as text


class EncryptedWds(EncryptedFolder):
    """Encrypted WebDataset shards per split with a manifest."""

    format: ClassVar[str] = "wds"
    kind: ClassVar[str] = "encrypted-wds"

    def shard_files(self, split: str) -> list[Path]:
        """The shards of one split, in order."""
        return sorted((Path(self.path) / split).glob("shard-*.tar"))

    def split_classes(self, split: str) -> list[str]:
        """The split's class list (labels index it); a one-line error for a split it does not have."""
        classes = self.manifest.classes.get(split) if self.manifest else None
        if not classes:
            have = sorted(self.manifest.classes) if self.manifest else []
            raise ValueError(f"encrypted dataset {self.path}: has no {split!r} split (it has {have})")
        return classes

    def _items(self, select: Select = None) -> Iterator[Item]:
        for split in sorted(self.manifest.classes if self.manifest else {}):
            classes = self.split_classes(split)
            for shard, sample in read_samples(self.shard_files(split)):
                png, label = labelled(shard, sample, len(classes))
                rel = posixpath.join(split, f"{sample['__key__']}.png")
                if class_of(rel) != classes[label]:
                    raise ValueError(f"shard {shard}: sample {rel}: its .cls says {classes[label]} (damaged)")
                if select is None or select(rel):
                    yield rel, png


def labelled(shard: Path, sample: dict[str, Any], n_classes: int) -> tuple[bytes, int]:
    """(PNG bytes, label) of one sample; a sample without either, or with a label out of range, is damage."""
    key = sample["__key__"]
    missing = [ext for ext in ("png", "cls") if ext not in sample]
    if missing:
        raise ValueError(f"shard {shard}: sample {key} has no .{missing[0]} (damaged encrypted dataset)")
    try:
        label = int(sample["cls"])
    except ValueError:
        label = -1
    if not 0 <= label < n_classes:
        raise ValueError(f"shard {shard}: sample {key} has .cls {sample['cls'][:20]!r}, not a class index")
    return sample["png"], label


def png_array(data: bytes, where: object) -> np.ndarray:
    """An encrypted PNG as an HWC uint8 RGB array; a damaged one is an error naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"encrypted dataset {where}: an image cannot be decoded ({exc.__class__.__name__})") from None


def png_bound(size: int) -> int:
    """Bytes an encrypted PNG of ``size`` x ``size`` may take: twice its raw pixels plus 1 MiB
    (PNG stored uncompressed is raw plus a byte a row and a few per chunk)."""
    return 2 * (3 * size * size + size) + (1 << 20)


def check_shard(shard: Path, size: int) -> int:
    """The images of one ``ppvit encrypt --format wds`` shard, checked from its tar headers and each
    PNG's first 24 bytes (never a whole member): a plain tar of ``KEY.png`` and ``KEY.cls`` members
    only, each PNG at most ``size`` pixels a side and :func:`png_bound` bytes. What a shard may
    expand to when read is then bounded by what it holds; a ValueError names the first problem."""
    images = 0
    with open_shard(shard, compressed=False) as tar:
        for member in members(tar, shard):
            name = member.name.removeprefix("./")
            ext = name.rpartition(".")[2]
            if not member.isreg() or ext not in ("png", "cls"):
                raise ValueError(f"shard {shard.name}: member {name[:80]!r} is not a KEY.png or KEY.cls file")
            bound = png_bound(size) if ext == "png" else CLS_BYTES
            if member.size > bound:
                raise ValueError(f"shard {shard.name}: {name[:80]} is {member.size} bytes, over {bound}")
            if ext == "png":
                head = tar.extractfile(member).read(24)
                if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
                    raise ValueError(f"shard {shard.name}: {name[:80]} is not a PNG")
                width, height = struct.unpack(">II", head[16:24])
                if not (0 < width <= size and 0 < height <= size):
                    raise ValueError(f"shard {shard.name}: {name[:80]} is {width}x{height}, over {size} px")
                images += 1
    return images
