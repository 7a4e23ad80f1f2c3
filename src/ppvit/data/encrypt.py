"""Encrypting and decrypting collections: ``ppvit encrypt`` and ``ppvit decrypt``.

Any source of :mod:`ppvit.data.sources` goes in; outputs are lossless (:mod:`ppvit.data.sinks`):
PNG files mirroring the source tree, npz shards per split for fast loading, or
WebDataset tar shards of PNGs (``.png`` + ``.cls``) per split for streaming. A JPEG or WebP
output is refused, since lossy compression destroys the pixel shuffling. The dense mixings'
ciphertext (``mix``: float16, ``lift``: int16 or int32, 2 or 4 bytes a value) is written as npz
only: PNG holds 8 bits a value.

A manifest (``ppvit-manifest.json``) beside the output records the scheme, block size, input
size, format, classes and the key fingerprint, never the key. It is written before the first
image, so an interrupted run can be continued (outputs that exist are skipped) and a run with
another key or scheme, or from a source whose images changed since (its ``listing``), cannot write into the
same folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ppvit import __version__
from ppvit._io import remove_stale_temps
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import MAX_INPUT_SIZE, Key
from ppvit.data.manifest import (
    FORMATS,
    MANIFEST_NAME,
    MARKER,
    PLAIN,
    WDS_SHARD_SIZE,
    Format,
    Manifest,
    marker_agrees,
    marker_text,
    read_manifest,
    write_manifest,
)
from ppvit.data.preprocess import KERNEL, Preprocess
from ppvit.data.sinks import Sink, open_sink, output_name
from ppvit.data.sources import Columns, Item, Select, Source, SplitNames, open_source
from ppvit.data.sources.base import Data, decode, split_of
from ppvit.data.workers import Result, transform_all

log = logging.getLogger(__name__)

LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


@dataclass
class Summary:
    """What a run did; ``failed`` lists (relative path, problem) for every bad input."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def check_output(dst: Path, fmt: str) -> None:
    """Refuse lossy outputs and destinations that are not folders."""
    if fmt not in FORMATS:
        reason = " (lossy compression would destroy the shuffling)" if fmt.lower() in ("jpg", "jpeg", "webp") else ""
        raise ValueError(f"output format {fmt!r} is not supported{reason}; use png, npz or wds")
    if dst.suffix.lower() in LOSSY_SUFFIXES:
        raise ValueError(
            f"output {dst}: a lossy format would destroy the shuffling; give a folder (PNG files are written)"
        )
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"output {dst}: exists and is not a folder")
    if dst.is_dir() and not (dst / MANIFEST_NAME).exists() and any(not p.name.startswith(".") for p in dst.iterdir()):
        raise ValueError(
            f"output {dst}: holds files but no {MANIFEST_NAME} (not an output of ppvit to continue); "
            "give a new or empty folder"
        )


def check_apart(
    source: str | os.PathLike, dst: Path, what: str = "output", of: str = "the source", holding: bool = False
) -> None:
    """Refuse an output inside the source folder (or, unless ``holding``, holding it): written into itself, a
    folder's plain images were taken for outputs already there (exit 0, a manifest calling them ciphertext), and a
    rerun reads the outputs as inputs (a run folder in its data: its files became images of no class, ``adapter/`` a
    class). A run folder may hold its data (``--data data --out .``): nothing it writes lands in it."""
    src, out = Path(source), dst.resolve()
    if not src.exists():  # a brace pattern, a hub or download name: nothing on disk to overlap
        return
    src = src.resolve()
    if src == out or src in out.parents or (not holding and src.is_dir() and out in src.parents):
        raise ValueError(f"{what} {dst}: overlaps {of} {source}; give a folder apart from it")


def check_continued(old: Manifest, manifest: Manifest, dst: Path, source: str) -> None:
    """A run continuing output ``dst`` (its manifest ``old``) must write what the earlier run did: the same key and
    geometry, format, shard size, classes and source images, or outputs of both would mix in one dataset."""
    old.check(manifest.scheme, manifest.block_size, fingerprint=manifest.key_fingerprint, where=f"output {dst}")
    if old.size != manifest.size:  # unset is no wildcard here: images of the source's size and --size's would mix
        raise ValueError(
            f"output {dst}: was written {_with_size(old.size)}, this run is {_with_size(manifest.size)}; "
            "continue it as it was written, or give a new output folder"
        )
    if old.format != manifest.format:
        raise ValueError(f"output {dst}: holds {old.format} output, not {manifest.format}")
    if old.shard_size != manifest.shard_size:
        raise ValueError(f"output {dst}: was written with shard size {old.shard_size}, not {manifest.shard_size}")
    if manifest.format == "wds" and old.classes != manifest.classes:
        raise ValueError(f"output {dst}: its classes {old.classes} differ from the source's now; use a new output")
    if old.listing is not None and old.listing != manifest.listing:  # None: written before ppvit recorded it
        raise ValueError(
            f"output {dst}: was written from other images than {source} holds now (added, removed or "
            "renamed since); give a new output folder (client train: --work)"
        )


def _with_size(size: int | None) -> str:
    return "without --size" if size is None else f"with --size {size}"


def transform_collection(
    src: str | os.PathLike | Source,
    dst: str | os.PathLike,
    cipher: BlockCipher,
    manifest: Manifest,
    decrypting: bool = False,
    workers: int = 1,
    progress: bool = True,
    select: Select = None,
    columns: Columns | None = None,
    strict: bool = False,
) -> Summary:
    """Encrypt (or decrypt) every image of ``src`` (any source: :func:`ppvit.data.sources.open_source`)
    into ``dst``; the shared engine of both verbs. An image that cannot be read is counted in the summary,
    or with ``strict`` stops the run (ValueError naming it; a rerun continues)."""
    source = open_source(src, columns)
    dst = Path(dst)
    check_apart(source.path, dst)
    check_output(dst, manifest.format)
    counts, manifest.listing = survey(
        source, select, manifest.block_size, manifest.size, manifest.format, check_sizes=not decrypting
    )
    workers = max(1, min(workers, sum(counts.values()), os.cpu_count() or 1))
    labels: list[str] = []
    if manifest.format == "wds":  # the label space first: each sample's .cls is an index into it
        manifest.shard_size = manifest.shard_size or WDS_SHARD_SIZE
        splits, labels = source.splits_and_classes(select)
        manifest.classes = {split: labels for split in splits}
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / MANIFEST_NAME).exists():
        check_continued(read_manifest(dst), manifest, dst, str(source.path))
    write_manifest(dst, manifest)  # before the first image: claims the folder for these settings
    for tmp in remove_stale_temps(dst):  # an interrupted run's half-written files
        log.info("removed %s (left by an interrupted run)", tmp)

    t0 = time.perf_counter()
    summary = Summary()
    marker = None if decrypting else marker_text(manifest)  # plain output is not marked
    sink = open_sink(manifest.format, dst, manifest.shard_size, labels, counts, marker)

    def fresh(items: Iterator[Item]) -> Iterator[Item]:
        for rel, data in items:
            if sink.claim(rel):
                summary.skipped += 1
                bar.update()
            else:
                yield rel, data

    stated = marker_text(source.manifest) if decrypting and source.manifest is not None else None  # what files say
    init = (cipher.key.secret, str(cipher.scheme), cipher.block_size, manifest.size, decrypting, stated)
    bar = tqdm(
        desc="decrypting" if decrypting else "encrypting", total=sum(counts.values()), unit="img", disable=not progress
    )
    with bar:

        def consume(results: Iterator[Result]) -> None:
            _consume(results, sink, summary, bar, strict, str(source.path))

        try:
            transform_all(fresh(source.items(select)), init, workers, consume)
            sink.close()
        except BaseException:  # a full disk, Ctrl-C: no half-written shard left behind (a rerun redoes it)
            sink.abort()
            raise
    manifest.classes, manifest.counts = sink.inventory()
    manifest.complete = not summary.failed
    write_manifest(dst, manifest)
    summary.seconds = time.perf_counter() - t0
    return summary


def survey(
    source: Source, select: Select, block_size: int, size: int | None, fmt: str = "png", check_sizes: bool = True
) -> tuple[dict[str, int], str]:
    """The number of images per split and the SHA-256 of their paths in source order (the manifest's ``listing``),
    after checking up front what would fail every image (one line, nothing written).

    The listing is what a rerun is held to: the sinks place images by their order (npz and wds shards by index,
    PNG files by name), so a source with an image added, removed or renamed since would be dealt anew over the
    shards kept (images twice, others missing) or leave outputs of images it no longer holds. It is of the paths,
    not :meth:`~ppvit.data.sources.Source.identity` (a folder's is the folder's own times and absolute path: an
    image added to a class folder leaves it as it was, and a moved source changes it).

    With ``size`` it must be a multiple of the block size, and at most :data:`~ppvit.crypto.keys.MAX_INPUT_SIZE`.
    Without it the images must share one size that is: a first pass reads each image's header (PIL reads the size
    without decoding) and stops at the first image of another size, so a mixed source never leaves a half dataset.
    An empty source is refused, and one where two images would be written under one name (``a.jpg``, ``a.png``:
    the second was taken for the first's output, one image lost without a word).
    """
    if size is not None and check_sizes and (size < block_size or size % block_size):
        raise ValueError(f"--size {size} is not a multiple of the block size {block_size}")
    if size is not None and size > MAX_INPUT_SIZE:
        raise ValueError(f"--size {size}: at most {MAX_INPUT_SIZE}")
    counts: Counter[str] = Counter()
    names: dict[str, str] = {}
    listing = hashlib.sha256()

    def count(rel: str) -> None:
        first = names.setdefault(output_name(fmt, rel), rel)
        if first != rel:
            raise ValueError(
                f"source {source.path}: {first} and {rel} would both be written as {output_name(fmt, rel)}; rename one"
            )
        counts[split_of(rel)] += 1
        listing.update(rel.encode("utf-8", "surrogateescape") + b"\0")  # no path holds a NUL

    if size is not None or not check_sizes:
        for rel in source.paths(select):
            count(rel)
    else:
        first = None
        for rel, data in source.items(select):
            count(rel)
            dims = _dims(data)
            if dims is None:  # unreadable: one failed image later, as before
                continue
            if first is None:
                first = rel, dims
            elif dims != first[1]:
                (w, h), (w2, h2) = first[1], dims
                raise ValueError(
                    f"source {source.path}: images of several sizes ({first[0]} is {w}x{h}, {rel} is {w2}x{h2}); "
                    "pass --size to resize them all to the model's input size"
                )
        if first is not None and (first[1][0] % block_size or first[1][1] % block_size):
            w, h = first[1]
            raise ValueError(
                f"source {source.path}: images are {w}x{h}, not a multiple of the block size {block_size}; "
                "pass --size (e.g. the model's input size)"
            )
    if not counts:
        raise ValueError(f"source {source.path}: no images found")
    return dict(counts), listing.hexdigest()


def _dims(data: Data) -> tuple[int, int] | None:
    """An image's (width, height) from its header alone; None when it cannot be read (reported when transformed)."""
    if isinstance(data, np.ndarray):
        return data.shape[1], data.shape[0]
    if isinstance(data, OSError):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # PIL raises many types for bad files
        return None


def _consume(results: Iterator[Result], sink: Sink, summary: Summary, bar: tqdm, strict: bool, where: str) -> None:
    """Write each result; a failed one is counted, or with ``strict`` raised naming it (``where``: the source)."""
    for rel, arr, error in results:
        if error is not None and strict:
            raise ValueError(f"{where}: {rel}: {error} (--strict: stopped at the first unreadable image)")
        if error is not None:
            summary.failed.append((rel, error))
        else:
            sink.add(rel, arr)
            summary.written += 1
        bar.update()


def encrypt_collection(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cipher: BlockCipher,
    size: int | None = None,
    fmt: Format = "png",
    workers: int = 1,
    progress: bool = True,
    select: Select = None,
    columns: Columns | None = None,
    shard_size: int | None = None,
    splits: SplitNames | None = None,
    strict: bool = False,
) -> Summary:
    """Encrypt any source of :mod:`ppvit.data.sources` into ``dst`` (resized to ``size`` first if given).

    ``shard_size``: images per WebDataset shard (``fmt="wds"`` only; default 1000). ``splits``: the
    source's splits written as ``train`` and ``test`` (the others left out), where it names them otherwise.
    ``strict``: stop at the first unreadable image (else each is counted in the summary).
    """
    if shard_size is not None and (fmt != "wds" or shard_size < 1):
        raise ValueError(f"shard size {shard_size}: only for --format wds, and at least 1")
    fingerprint, dtype = cipher.key.fingerprint, cipher.ciphertext_dtype()  # not uint8 (mix, lift): npz only
    manifest = Manifest(str(cipher.scheme), cipher.block_size, size, fingerprint, fmt, __version__, dtype=dtype)
    manifest.shard_size = shard_size
    manifest.preprocess = None if size is None else Preprocess(size, KERNEL, None, None)
    source = open_source(src, columns, splits)
    source.check_plain("encrypt")
    return transform_collection(source, dst, cipher, manifest, False, workers, progress, select, strict=strict)


def decrypt_collection(
    src: str | os.PathLike, dst: str | os.PathLike, key: Key, workers: int = 1, progress: bool = True
) -> Summary:
    """Undo :func:`encrypt_collection` whatever its format (png, npz or wds): PNG files in ImageFolder layout;
    refuses a key whose fingerprint differs from the manifest's."""
    src = Path(src)
    manifest = read_manifest(src)
    manifest.check(fingerprint=key.fingerprint, where=f"{src}")
    cipher = BlockCipher(key, manifest.scheme, manifest.block_size)
    plain = Manifest(PLAIN, manifest.block_size, manifest.size, key.fingerprint, "png", __version__)
    source = open_source(src)
    first = next(iter(source.items()), None)  # a manifest edited by hand: one line, not a failure an image
    if first is not None and isinstance(first[1], bytes) and (got := decode(*first)).error is None:
        stated = got.image.info.get(MARKER)
        if not marker_agrees(stated, marker_text(manifest)):
            raise ValueError(f"{src}: its manifest says {marker_text(manifest)}; its image {first[0]}, {stated}")
    return transform_collection(source, dst, cipher, plain, True, workers, progress)
