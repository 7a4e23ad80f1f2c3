"""What a client declares of a dataset it uploads: its manifest and every shard's size and SHA-256, checked
against :class:`~ppvit.data.manifest.Manifest`'s own schema and the operator's limits before anything is stored
(:class:`DatasetLimits`; every refusal a :class:`~ppvit.serve.service_db.DatasetError`, 422)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import MISSING, dataclass, fields
from typing import Any

from ppvit.crypto.ciphers import Scheme
from ppvit.data.manifest import Manifest
from ppvit.serve.defaults import MAX_CLASSES, NAME, NAME_RULE
from ppvit.serve.service_db import DatasetError
from ppvit.serve.tenants import check_classes

SPLIT = re.compile(r"[a-z0-9_]{1,32}")
SHARD_PATH = re.compile(r"[a-z0-9_]{1,32}/shard-[0-9]{6}\.tar")  # what `ppvit encrypt --format wds` writes
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SPLITS = 4  # splits of one manifest (ppvit encrypt writes train and test)
MIN_BLOCK = 2  # a block of one pixel is no block
TEXT_FIELD = 128  # characters of a manifest's free text (fingerprint, version)


@dataclass(frozen=True)
class DatasetLimits:
    """What one tenant's datasets may hold (the operator's, from ``ppvit serve``'s flags)."""

    quota_bytes: int = 10 << 30  # declared shard bytes, all its datasets
    datasets: int = 20  # datasets of one tenant
    shards: int = 10_000  # shards of one declaration
    classes: int = MAX_CLASSES  # classes of one split
    img_size: int = 512  # the manifest's input size (the job builds its model at it)


@dataclass(frozen=True)
class ShardSpec:
    path: str  # "train/shard-000000.tar"
    bytes: int
    sha256: str


def parse_manifest(doc: Any, limits: DatasetLimits) -> Manifest:
    """A client's manifest: a finished WebDataset encryption with a scheme, a size and a fingerprint,
    checked against :class:`Manifest`'s own types (the one schema) and the server's limits."""
    if not isinstance(doc, dict):
        raise DatasetError(422, "manifest: not a JSON object")
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(str(k)[:40] for k in doc if k not in known)
    if unknown:
        raise DatasetError(422, f"manifest: unknown fields {', '.join(unknown[:5])}")
    needed = sorted(f.name for f in fields(Manifest) if f.name not in doc and f.default is MISSING is f.default_factory)
    if needed:
        raise DatasetError(422, f"manifest: needs {', '.join(needed)}")
    try:
        m = Manifest(**doc)
    except (TypeError, ValueError) as exc:  # a malformed preprocess
        raise DatasetError(422, f"manifest: {exc}") from None
    try:
        m.validate("manifest: ")
    except ValueError as exc:
        raise DatasetError(422, str(exc)) from None
    for split, names in m.classes.items():  # a label's name says which class it is
        twice = next((n for n, count in Counter(names).items() if count > 1), None)
        if twice is not None:
            raise DatasetError(422, f"manifest: classes of {split}: {twice[:40]!r} is named more than once")
    if max(len(m.scheme), len(m.key_fingerprint), len(m.ppvit_version)) > TEXT_FIELD or not m.key_fingerprint:
        raise DatasetError(422, f"manifest: a scheme, key fingerprint and version of 1 to {TEXT_FIELD} characters")
    if m.format != "wds":
        raise DatasetError(422, f"manifest: format {m.format!r}; upload `ppvit encrypt --format wds` output")
    if not m.complete:
        raise DatasetError(422, "manifest: the encryption did not finish (complete is false); run it again first")
    if m.scheme in ("", "none", "plain"):
        raise DatasetError(422, "manifest: plain images; the service trains on encrypted images only")
    try:
        Scheme.parse(m.scheme)
    except ValueError as exc:
        raise DatasetError(422, f"manifest: scheme {m.scheme[:40]!r}: {exc}") from None
    if m.size is None or not MIN_BLOCK <= m.block_size <= m.size <= limits.img_size or m.size % m.block_size:
        raise DatasetError(
            422,
            f"manifest: input size {m.size}, block size {m.block_size}: this server takes a size of at most "
            f"{limits.img_size} px in blocks of at least {MIN_BLOCK} that divide it (encrypt with --size)",
        )
    if "train" not in m.classes or len(m.classes) > MAX_SPLITS or not all(map(SPLIT.fullmatch, m.classes)):
        raise DatasetError(422, f"manifest: a train split and at most {MAX_SPLITS} splits named like shards' folders")
    if any(n < 0 for n in m.counts.values()) or (m.shard_size is not None and m.shard_size < 1):
        raise DatasetError(422, "manifest: counts and shard size cannot be negative")
    if not set(m.counts) <= set(m.classes):
        raise DatasetError(422, "manifest: counts of a split it has no classes for")
    try:
        check_classes([name for names in m.classes.values() for name in names], limits.classes * len(m.classes))
        for names in m.classes.values():
            check_classes(names, limits.classes)
    except ValueError as exc:
        raise DatasetError(422, f"manifest: {exc}") from None
    return m


def parse_shards(doc: Any, most: int) -> list[ShardSpec]:
    if not isinstance(doc, list) or not doc or len(doc) > most:
        raise DatasetError(422, f"shards: a list of 1 to {most} {{path, bytes, sha256}} objects")
    out, seen = [], set()
    for item in doc:
        if not isinstance(item, dict) or set(item) != {"path", "bytes", "sha256"}:
            raise DatasetError(422, "shards: each one is {path, bytes, sha256}")
        path, size, digest = item["path"], item["bytes"], item["sha256"]
        if not (isinstance(path, str) and SHARD_PATH.fullmatch(path)):
            raise DatasetError(422, f"shard path {str(path)[:80]!r}: not SPLIT/shard-NNNNNN.tar")
        if not (type(size) is int and size > 0) or not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise DatasetError(422, f"shard {path}: bytes must be a positive integer, sha256 64 lowercase hex digits")
        if path in seen:
            raise DatasetError(422, f"shard {path}: listed twice")
        seen.add(path)
        out.append(ShardSpec(path, size, digest))
    return out


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise DatasetError(422, f"dataset name {name[:80]!r}: {NAME_RULE}")
