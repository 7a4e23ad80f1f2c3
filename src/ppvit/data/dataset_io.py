"""Image collections on disk: reading sources, writing encrypted datasets, manifests.

Sources are a folder tree of images (ImageFolder layout), a single image, or a tar /
tar.gz archive (read member by member, never extracted); Hugging Face datasets and
WebDataset shards are read by :mod:`ppvit.data.sources` into the same stream. Outputs are
lossless: PNG files mirroring the source tree, uint8 numpy shards per split for fast
loading, or WebDataset tar shards of PNGs (``.png`` + ``.cls``) per split for streaming. A
JPEG or WebP output is refused, since lossy compression destroys the pixel shuffling.

A manifest (``ppvit-manifest.json``) beside the output records the scheme, block size,
input size, format, classes and the key fingerprint, never the key. It is written before
the first image, so an interrupted run can be continued (outputs that exist are skipped)
and a run with another key or scheme cannot write into the same folder.
"""

from __future__ import annotations

import ctypes
import errno
import io
import itertools
import logging
import os
import posixpath
import signal
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ppvit import __version__
from ppvit._io import _naming, atomic_write, atomic_write_bytes, commit_temp, remove_stale_temps
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.images import IMAGE_SUFFIXES, resize_array
from ppvit.data.manifest import (
    FORMATS,
    MANIFEST_NAME,
    PLAIN,
    SHARD_SIZE,
    WDS_SHARD_SIZE,
    Format,
    Manifest,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


@dataclass
class ImageItem:
    """One source image: its path relative to the source, and the decoded image or an error."""

    relpath: str
    image: Image.Image | None = None
    error: str | None = None


def iter_image_bytes(
    src: str | os.PathLike, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | OSError]]:
    """(relative path, raw bytes or why they cannot be read) of every image in a folder tree, file or tar archive.

    Hidden names (``.x``, macOS ``._x.jpg`` resource forks) are not images. A damaged archive
    or a member that would land outside the output folder (``../x``, ``/x``) stops the run.
    A dangling or looping symbolic link in a folder is an unreadable image, named like any other.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"source {src}: not found")
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if _is_image(p.relative_to(src).as_posix()) and _is_file(p)):
            rel = path.relative_to(src).as_posix()
            if select is None or select(rel):
                yield rel, _read(path)
    elif tarfile.is_tarfile(src):
        try:
            with tarfile.open(src, "r:*") as tar:
                members = _TarMembers(tar)
                for member in tar:
                    rel = member.name.removeprefix("./")
                    if (member.isfile() or member.issym() or member.islnk()) and _is_image(rel):
                        if select is not None and not select(rel):
                            continue
                        if Path(rel).is_absolute() or ".." in Path(rel).parts:
                            raise ValueError(f"archive {src}: member {member.name!r} has an unsafe path; refusing it")
                        yield rel, members.read(member)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise ValueError(f"archive {src}: damaged ({exc.__class__.__name__}: {exc})") from None
    elif src.suffix.lower() in IMAGE_SUFFIXES:
        yield src.name, _read(src)
    else:
        raise ValueError(f"source {src}: not an image, a folder of images or a tar archive")


def _is_image(relpath: str) -> bool:
    parts = Path(relpath).parts
    return Path(relpath).suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") and p != ".." for p in parts)


def _is_file(path: Path) -> bool:
    """A file, or a symbolic link that is not to a folder (a broken one included: it is reported, not skipped)."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def _read(path: Path) -> bytes | OSError:
    """An unreadable file is one failed image, not the end of the run."""
    try:
        return path.read_bytes()
    except OSError as exc:
        if path.is_symlink() and exc.errno is not None:  # dangling or looping: say so
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return OSError(exc.errno, f"symbolic link to {target}: {exc.strerror}")
        return exc


class _TarMembers:
    """Reads a tar member, following symbolic and hard links inside the archive only.

    An archive is never extracted, so no link is ever resolved on the file system. A symbolic
    link is resolved against its member's folder, a hard link against the archive's root (and
    only to a member before it, as tar writes them). A link that leaves the archive (``/x``,
    ``../x``), names no member, loops, or ends at something other than a file is an unreadable
    image (an ``OSError`` value), named like a dangling link in a folder.
    """

    MAX_HOPS = 40  # as Linux's limit on nested symbolic links

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.index: dict[str, tarfile.TarInfo] | None = None  # built at the first link: it reads every header

    def _find(self, name: str) -> tarfile.TarInfo | None:
        if self.index is None:
            self.index = {posixpath.normpath(m.name): m for m in self.tar.getmembers()}  # the last of a name wins
        return self.index.get(name)

    def read(self, member: tarfile.TarInfo) -> bytes | OSError:
        link = f"{'symbolic' if member.issym() else 'hard'} link to {member.linkname}"
        target = member
        for _ in range(self.MAX_HOPS):
            if not (target.issym() or target.islnk()):
                break
            why = link if target is member else f"{link}, via {target.name} -> {target.linkname}"
            base = posixpath.dirname(target.name) if target.issym() else ""
            name = posixpath.normpath(posixpath.join(base, target.linkname))
            if posixpath.isabs(target.linkname) or name == ".." or name.startswith("../"):
                return OSError(errno.EXDEV, f"{why}: outside the archive, not followed")
            found = self._find(name)
            if found is None or (target.islnk() and found.offset >= target.offset):
                return OSError(errno.ENOENT, f"{why}: not in the archive")
            target = found
        else:
            return OSError(errno.ELOOP, f"{link}: {os.strerror(errno.ELOOP)}")
        if not target.isfile():
            return OSError(errno.EISDIR, f"{link}: not a file in the archive")
        return self.tar.extractfile(target).read()


def decode(relpath: str, data: bytes | OSError) -> ImageItem:
    """Decode to RGB; an unreadable or corrupt file becomes an item with an error, not an exception."""
    if isinstance(data, OSError):
        return ImageItem(relpath, error=f"cannot read ({data.strerror or data})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return ImageItem(relpath, im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad files
        return ImageItem(relpath, error=f"cannot decode ({exc.__class__.__name__}: {exc})")


def iter_images(src: str | os.PathLike, select: Callable[[str], bool] | None = None) -> Iterator[ImageItem]:
    """Decoded images of a source, in a stable order."""
    for rel, data in iter_image_bytes(src, select):
        yield decode(rel, data)


def class_of(relpath: str) -> str:
    """The ImageFolder class: the folder holding the file ('' for a file at the top)."""
    parts = Path(relpath).parts
    return parts[-2] if len(parts) >= 2 else ""


def split_of(relpath: str) -> str:
    """The split folder above the class folder ('' when there is none)."""
    parts = Path(relpath).parts
    return parts[0] if len(parts) >= 3 else ""


# -- encrypting and decrypting collections --------------------------------------------------------


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


_worker: dict[str, object] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(secret: bytes, scheme: str, block_size: int, size: int | None, decrypting: bool) -> None:
    """Sets up the transform (in each worker process: the key arrives through the pool, never argv or logs)."""
    _worker.update(cipher=BlockCipher(Key(secret), scheme, block_size), size=size, decrypting=decrypting)


def _init_pool_worker(*args: object) -> None:
    """The pool's initializer: tie the worker's life to its parent's, then :func:`_init_worker`."""
    _die_with_parent()
    _init_worker(*args)  # type: ignore[arg-type]


def _die_with_parent() -> None:
    """Make this worker exit when the process that started it dies, even by SIGKILL.

    Otherwise a killed ``ppvit encrypt`` leaves its workers asleep on the task queue forever.
    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Everywhere:
    a daemon thread exits when the parent changes (the orphan is re-parented). Ctrl-C goes to
    the whole process group: workers ignore it and the parent stops the pool, so only the
    parent reports it.
    """
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the parent's handler
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="ppvit-parent-watch", daemon=True).start()


def _transform_one(item: tuple[str, bytes | OSError]) -> tuple[str, np.ndarray | None, str | None]:
    """Decode, resize, encrypt (or decrypt) one image: the work a worker does."""
    got = decode(*item)
    if got.error is not None:
        return got.relpath, None, got.error
    arr, size = np.asarray(got.image), _worker["size"]
    if size is not None:
        arr = resize_array(arr, size)
    cipher: BlockCipher = _worker["cipher"]  # type: ignore[assignment]
    try:
        out = cipher.decrypt(arr) if _worker["decrypting"] else cipher.encrypt(arr)
    except ValueError as exc:  # e.g. a side that is not a multiple of the block size
        return got.relpath, None, str(exc)
    return got.relpath, out, None


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def transform_collection(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cipher: BlockCipher,
    manifest: Manifest,
    decrypting: bool = False,
    workers: int = 1,
    progress: bool = True,
    select: Callable[[str], bool] | None = None,
    columns: object = None,
) -> Summary:
    """Encrypt (or decrypt) every image of ``src`` into ``dst``; the shared engine of both verbs.

    ``src`` is any source of :mod:`ppvit.data.sources` (``columns``: a Hugging Face dataset's
    :class:`~ppvit.data.sources.Columns`).
    """
    from ppvit.data import sources  # it builds on this module's readers

    dst = Path(dst)
    check_output(dst, manifest.format)
    labels: list[str] = []
    if manifest.format == "wds":  # the label space first: each sample's .cls is an index into it
        manifest.shard_size = manifest.shard_size or WDS_SHARD_SIZE
        paths = list(sources.source_paths(src, select, columns))
        labels = sorted({class_of(r) for r in paths} - {sources.UNLABELLED})
        manifest.classes = {split: labels for split in sorted({split_of(r) for r in paths})}
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / MANIFEST_NAME).exists():
        old = read_manifest(dst)
        old.check(manifest.scheme, manifest.block_size, manifest.size, manifest.key_fingerprint, where=f"output {dst}")
        if old.format != manifest.format:
            raise ValueError(f"output {dst}: holds {old.format} output, not {manifest.format}")
        if old.shard_size != manifest.shard_size:
            raise ValueError(f"output {dst}: was written with shard size {old.shard_size}, not {manifest.shard_size}")
        if manifest.format == "wds" and old.classes != manifest.classes:
            raise ValueError(f"output {dst}: its classes {old.classes} differ from the source's now; use a new output")
    write_manifest(dst, manifest)  # before the first image: claims the folder for these settings
    for tmp in remove_stale_temps(dst):  # an interrupted run's half-written files
        log.info("removed %s (left by an interrupted run)", tmp)

    t0 = time.perf_counter()
    summary = Summary()
    if manifest.format == "wds":
        sink: _PngSink | _ShardSink | _WdsSink = _WdsSink(dst, manifest.shard_size, labels)
    else:
        sink = _PngSink(dst) if manifest.format == "png" else _ShardSink(dst)
    stream = sources.iter_source_bytes(src, select, columns)
    pending = ((rel, data) for rel, data in stream if not sink.claim(rel, summary))
    init = (cipher.key.secret, str(cipher.scheme), cipher.block_size, manifest.size, decrypting)
    with tqdm(desc="decrypting" if decrypting else "encrypting", unit="img", disable=not progress) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers, initializer=_init_pool_worker, initargs=init) as pool:
                try:
                    # bounded windows: Executor.map would read the whole source before the first result
                    while window := list(itertools.islice(pending, 64 * workers)):
                        _consume(pool.map(_transform_one, window, chunksize=16), sink, summary, bar)
                except BaseException:  # a full disk, Ctrl-C, SIGTERM: drop the queued work, not only finish it
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            _init_worker(*init)
            _consume(map(_transform_one, pending), sink, summary, bar)
        sink.close()
    manifest.classes, manifest.counts = sink.inventory()
    manifest.complete = not summary.failed
    write_manifest(dst, manifest)
    summary.seconds = time.perf_counter() - t0
    return summary


def _consume(results: Iterator, sink: _PngSink | _ShardSink | _WdsSink, summary: Summary, bar: tqdm) -> None:
    for rel, arr, error in results:
        if error is not None:
            summary.failed.append((rel, error))
        else:
            sink.add(rel, arr)
            summary.written += 1
        bar.update()


def _inventory(entries: Iterator[tuple[str, str]]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(split -> sorted classes, split -> count) from (split, class) pairs."""
    classes: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for split, cls in entries:
        classes.setdefault(split, set()).add(cls)
        counts[split] = counts.get(split, 0) + 1
    # sorted: the same manifest whatever order the file system lists the files in
    return {k: sorted(classes[k]) for k in sorted(classes)}, {k: counts[k] for k in sorted(counts)}


class _PngSink:
    """One PNG per image, at the source's relative path with a .png suffix."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst

    def _path(self, rel: str) -> Path:
        return self.dst / Path(rel).with_suffix(".png")

    def claim(self, rel: str, summary: Summary) -> bool:
        """True (and counted as skipped) when ``rel`` is written already."""
        if self._path(rel).exists():
            summary.skipped += 1
            return True
        return False

    def add(self, rel: str, arr: np.ndarray) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _png_bytes(arr))

    def close(self) -> None:
        pass

    def inventory(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        rels = (p.relative_to(self.dst).as_posix() for p in self.dst.rglob("*.png"))
        return _inventory((split_of(r), class_of(r)) for r in rels)


class _NumberedShards:
    """Outputs in numbered shards per split: the i-th image of a split (in source order)
    belongs to shard i // shard_size, so a rerun skips every image whose shard exists and
    rewrites only unfinished shards."""

    def __init__(self, dst: Path, shard_size: int) -> None:
        self.dst, self.shard_size = dst, shard_size
        self.next_index: dict[str, int] = {}
        self.index: dict[str, int] = {}

    def _shard(self, split: str, number: int) -> Path:
        raise NotImplementedError

    def claim(self, rel: str, summary: Summary) -> bool:
        """Give ``rel`` the next index of its split; True (and counted as skipped) when its shard exists."""
        split = split_of(rel)
        i = self.next_index.get(split, 0)
        self.next_index[split] = i + 1
        self.index[rel] = i
        if self._shard(split, i // self.shard_size).exists():
            summary.skipped += 1
            return True
        return False


class _ShardSink(_NumberedShards):
    """uint8 NHWC shards per split, ``<split>/shard-00000.npz`` (images, class names, paths)."""

    def __init__(self, dst: Path) -> None:
        super().__init__(dst, SHARD_SIZE)
        self.buffers: dict[tuple[str, int], list[tuple[str, np.ndarray]]] = {}

    def _shard(self, split: str, number: int) -> Path:
        return self.dst / split / f"shard-{number:05d}.npz"

    def add(self, rel: str, arr: np.ndarray) -> None:
        split, shard = split_of(rel), self.index.pop(rel) // self.shard_size
        for key in [k for k in self.buffers if k[0] == split and k[1] < shard]:
            self._flush(key)  # results arrive in source order: earlier shards are complete
        self.buffers.setdefault((split, shard), []).append((rel, arr))

    def _flush(self, key: tuple[str, int]) -> None:
        buf = self.buffers.pop(key)
        path = self._shard(*key)
        path.parent.mkdir(parents=True, exist_ok=True)
        rels = [r for r, _ in buf]

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                images = np.stack([a for _, a in buf])
                np.savez(fh, images=images, classes=np.array([class_of(r) for r in rels]), paths=np.array(rels))

        atomic_write(path, write)

    def close(self) -> None:
        for key in list(self.buffers):
            self._flush(key)

    def inventory(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        def entries() -> Iterator[tuple[str, str]]:
            for shard in sorted(self.dst.rglob("shard-*.npz")):
                with np.load(shard) as z:
                    for p in z["paths"].tolist():
                        yield split_of(p), class_of(p)

        return _inventory(entries())


def encrypt_collection(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cipher: BlockCipher,
    size: int | None = None,
    fmt: Format = "png",
    workers: int = 1,
    progress: bool = True,
    select: Callable[[str], bool] | None = None,
    columns: object = None,
    shard_size: int | None = None,
) -> Summary:
    """Encrypt any source of :mod:`ppvit.data.sources` into ``dst`` (resized to ``size`` first if given).

    ``shard_size``: images per WebDataset shard (``fmt="wds"`` only; default 1000).
    """
    if shard_size is not None and (fmt != "wds" or shard_size < 1):
        raise ValueError(f"shard size {shard_size}: only for --format wds, and at least 1")
    manifest = Manifest(str(cipher.scheme), cipher.block_size, size, cipher.key.fingerprint, fmt, __version__)
    manifest.shard_size = shard_size
    return transform_collection(src, dst, cipher, manifest, False, workers, progress, select, columns)


def decrypt_collection(
    src: str | os.PathLike, dst: str | os.PathLike, key: Key, workers: int = 1, progress: bool = True
) -> Summary:
    """Undo :func:`encrypt_collection`; refuses a key whose fingerprint differs from the manifest's."""
    src = Path(src)
    manifest = read_manifest(src)
    manifest.check(fingerprint=key.fingerprint, where=f"{src}")
    if manifest.format != "png":
        raise ValueError(
            f"{src}: decrypting {manifest.format} shards is not supported; load them with ppvit.data.datasets"
        )
    cipher = BlockCipher(key, manifest.scheme, manifest.block_size)
    plain = Manifest(PLAIN, manifest.block_size, manifest.size, key.fingerprint, "png", __version__)
    return transform_collection(src, dst, cipher, plain, True, workers, progress)


def load_encrypted_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images NHWC uint8, labels, classes) of one split of an encrypted dataset, PNG or shards."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    classes = manifest.classes.get(split)
    if not classes:
        raise ValueError(f"encrypted dataset {folder}: has no {split!r} split (it has {sorted(manifest.classes)})")
    lookup = {c: i for i, c in enumerate(classes)}
    if manifest.format == "wds":
        images, labels = [], []
        for png, label in iter_wds_split(folder, split):
            images.append(png_array(png, folder))
            labels.append(label)
        return np.stack(images), np.array(labels, dtype=np.int64), classes
    if manifest.format == "npz":
        shards = sorted((folder / split).glob("shard-*.npz"))  # split '' is the folder itself
        images, names = [], []
        for shard in shards:
            with np.load(shard) as z:
                images.append(z["images"])
                names.extend(z["classes"].tolist())
    else:
        items = list(iter_images(folder / split))
        bad = [i for i in items if i.error]
        if bad:
            raise ValueError(f"encrypted dataset {folder}: {bad[0].relpath}: {bad[0].error}")
        images = [np.stack([np.asarray(i.image) for i in items])]
        names = [class_of(i.relpath) for i in items]
    return np.concatenate(images), np.array([lookup[n] for n in names], dtype=np.int64), classes


class _WdsSink(_NumberedShards):
    """WebDataset shards per split, ``<split>/shard-000000.tar``: ``KEY.png`` (the ciphertext) and ``KEY.cls``.

    ``KEY`` is the image's path below its split without suffix (``cat/00000012``); ``.cls`` is
    the class's index in the manifest's class list, as text. The i-th image of a split belongs
    to shard i // shard_size; a shard is written to a temporary name as its images arrive
    (never held in memory whole) and renamed when complete, so a rerun skips finished shards
    and rewrites only the one an interruption left unfinished.
    """

    def __init__(self, dst: Path, shard_size: int, classes: list[str]) -> None:
        super().__init__(dst, shard_size)
        self.lookup = {c: i for i, c in enumerate(classes)}
        self.open: dict[str, tuple[int, Path, Path, object, object]] = {}  # split -> number, path, tmp, file, writer

    def _shard(self, split: str, number: int) -> Path:
        return self.dst / split / f"shard-{number:06d}.tar"

    def add(self, rel: str, arr: np.ndarray) -> None:
        from ppvit.data.sources import optional

        wds = optional("webdataset")

        split, number = split_of(rel), self.index.pop(rel) // self.shard_size
        if split in self.open and self.open[split][0] != number:
            self._finish(split)  # results arrive in source order: the earlier shard is complete
        if split not in self.open:
            path = self._shard(split, number)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise _naming(exc, path) from None
            fh = os.fdopen(fd, "wb")
            self.open[split] = (number, path, Path(name), fh, wds.TarWriter(fh, encoder=False, mtime=0))
        below = Path(rel).relative_to(split) if split else Path(rel)
        key = below.with_suffix("").as_posix().replace(".", "_")
        writer = self.open[split][4]
        try:
            writer.write({"__key__": key, "png": _png_bytes(arr), "cls": str(self.lookup[class_of(rel)]).encode()})
        except OSError as exc:
            raise _naming(exc, self.open[split][1]) from None

    def _finish(self, split: str) -> None:
        _, path, tmp, fh, writer = self.open.pop(split)
        try:
            writer.close()  # the tar stream; the file is ours to close
            fh.close()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _naming(exc, path) from None
        commit_temp(tmp, path)

    def close(self) -> None:
        for split in list(self.open):
            self._finish(split)

    def inventory(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        classes = sorted(self.lookup, key=self.lookup.__getitem__)
        counts: dict[str, int] = {}
        for shard in sorted(self.dst.rglob("shard-*.tar")):
            split = shard.parent.relative_to(self.dst).as_posix().replace(".", "")
            with tarfile.open(shard) as tar:
                counts[split] = counts.get(split, 0) + sum(m.name.endswith(".png") for m in tar)
        return {split: classes for split in sorted(counts)}, {k: counts[k] for k in sorted(counts)}


def wds_shard_files(folder: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split of an encrypted WebDataset folder, in order."""
    return sorted((Path(folder) / split).glob("shard-*.tar"))


def iter_wds_split(folder: str | os.PathLike, split: str) -> Iterator[tuple[bytes, int]]:
    """(PNG bytes, label index) of every image of one split of ``ppvit encrypt --format wds`` output."""
    for shard in wds_shard_files(folder, split):
        try:
            with tarfile.open(shard) as tar:
                pending: dict[str, dict[str, bytes]] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                    if {"png", "cls"} <= set(pending[key]):
                        sample = pending.pop(key)
                        yield sample["png"], int(sample["cls"])
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ValueError(f"shard {shard}: damaged ({exc.__class__.__name__}: {exc})") from None


def png_array(data: bytes, where: object) -> np.ndarray:
    """An encrypted PNG as an HWC uint8 RGB array; a damaged one is an error naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"encrypted dataset {where}: an image cannot be decoded ({exc.__class__.__name__})") from None
