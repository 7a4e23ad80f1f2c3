"""Datasets as in-memory uint8 arrays: loading a split of any source, caching its decoded pixels, subsets and splits.

Small datasets (CIFAR-10 is 60,000 x 32 x 32 x 3 = 184 MB) are decoded once, cached (the npz
layout of :mod:`ppvit.data.sources.encrypted_npz`, private: see :mod:`ppvit.data.cache`), and held
in memory as one uint8 array, so a CPU training run never waits on JPEG decoding;
:mod:`ppvit.data.pipeline` makes batches of them. ``ppvit encrypt --format wds`` output is
streamed instead (:class:`~ppvit.data.streaming.ShardStream`). Torch-free until a stream is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ppvit.data.cache import decoded_cache
from ppvit.data.images import resize_array
from ppvit.data.manifest import DTYPES, Manifest
from ppvit.data.sources import Columns, Select, Source, SplitNames, class_of, decode, open_source
from ppvit.data.sources.cifar10 import CIFAR10_ENV
from ppvit.data.sources.cifar10 import NAME as CIFAR10_NAME
from ppvit.data.sources.encrypted_npz import read_npz, write_npz
from ppvit.data.sources.encrypted_wds import EncryptedWds
from ppvit.data.sources.wds import is_pattern

if TYPE_CHECKING:
    from ppvit.data.streaming import ShardStream

log = logging.getLogger(__name__)


@dataclass
class ArrayDataset:
    """Images as one NHWC array with integer labels (batches are gathered by index): uint8 pixels, or a dense
    mixing's ciphertext as stored (float16, int16, int32), which the pipeline normalises alike."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype.name not in DTYPES or self.images.ndim != 4 or self.images.shape[-1] != 3:
            got = f"{self.images.dtype} {self.images.shape}"
            raise ValueError(f"images must be NHWC RGB ({', '.join(DTYPES)}), got {got}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index], self.classes)


def resolve_data(data: str | os.PathLike | None = None) -> Path | None:
    """What ``--data`` names: ``data``, else $PPVIT_CIFAR10; None: CIFAR-10 downloaded (``cifar10``, or neither set)."""
    chosen = data or os.environ.get(CIFAR10_ENV)
    if not chosen or str(chosen) == CIFAR10_NAME:
        return None
    p = Path(chosen)
    if not is_pattern(str(chosen)) and not p.exists():
        raise FileNotFoundError(f"dataset {p}: not found")
    return p


def load_source_split(
    src: str | os.PathLike | Source | None,
    split: str | None = None,
    columns: Columns | None = None,
    size: int | None = None,
    failed: list[tuple[str, str]] | None = None,
) -> ArrayDataset:
    """One split of any source (:func:`ppvit.data.sources.open_source`) decoded into memory, cached by identity.

    ``split`` selects a top-level folder (``train``/``test`` in the CIFAR-10 copy), a dataset's
    split, or the shards named for it (None: the whole source). Labels index the manifest's class
    list for ``ppvit encrypt`` output, else the sorted class folders found. Images of one size are
    kept as they are (the pipeline resizes batches to the model input); plain images of several sizes
    (photos) are resized here to ``size``, the run's input size, by the one resize
    (:func:`ppvit.data.images.resize_array`). Ciphertext is never resized: one size or a refusal.
    An image that does not decode is appended to ``failed`` as (path, problem) and left out (a split with
    one is not cached, so every run names it); without a list the first one raises, naming it.
    """
    source = open_source(src, columns)
    where = source.path
    known = source.known_classes(split) if split is not None else None
    if source.manifest is not None and split is not None and not known:
        raise ValueError(
            f"encrypted dataset {where}: has no {split!r} split (it has {sorted(source.manifest.classes)})"
        )
    cached = _cache_file(source, split)
    resized_cache = _cache_file(source, split, size)
    for hit in (cached, resized_cache):
        if hit is not None and hit.exists():
            got = read_npz(hit)
            return ArrayDataset(got.images, got.labels, tuple(got.classes))
    select = None if split is None else lambda rel: rel.startswith(f"{split}/")

    def folder_class(rel: str) -> str:
        parts = Path(rel).parts[0 if split is None else 1 :]
        if len(parts) < 2:
            raise ValueError(f"{where}: {rel} is not inside a class folder (ImageFolder layout)")
        return parts[0]

    before = len(failed or ())
    images, names, rels, resized = _decode_images(source, select, size, folder_class, split, failed)
    if resized:
        cached = resized_cache
    if len(failed or ()) > before:
        cached = None
    classes = tuple(known or sorted(set(names)))
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise ValueError(f"{where}: class {unknown[0]!r} of split {split!r} is not in its manifest")
    ds = ArrayDataset(images, np.array([lookup[n] for n in names], dtype=np.int64), classes)
    if cached is not None:
        write_npz(cached, ds.images, ds.labels, ds.classes, rels, mode=0o600)
    return ds


def _decode_images(
    source: Source,
    select: Select,
    size: int | None,
    label: Callable[[str], str],
    split: str | None,
    failed: list[tuple[str, str]] | None = None,
) -> tuple[np.ndarray, list[str], list[str], bool]:
    """Every image ``select`` accepts as one uint8 NHWC array, with its ``label`` and path, and whether the
    images were resized: plain images of several sizes are brought to ``size`` (one log line saying so).
    A progress bar (with a total where the source lists its images cheaply) shows while INFO is logged:
    the first decode of CIFAR-10 takes about a minute."""
    from tqdm.auto import tqdm

    where = source.path
    images: list[np.ndarray] = []
    names, rels = [], []
    resizing = False
    shown = log.isEnabledFor(logging.INFO)  # off under -q: the CLI's logging level
    items = tqdm(
        source.items(select),
        desc=f"decoding {split or 'images'} (once: cached)" if source.cache_decoded else f"reading {split or 'images'}",
        total=source.count(select) if shown else None,
        unit="img",
        disable=not shown,
    )
    skipped = 0
    for rel, data in items:
        if isinstance(data, np.ndarray):
            image = data
        else:
            item = decode(rel, data)
            if item.error is not None and failed is None:
                raise ValueError(f"{where}: {rel}: {item.error}")
            if item.error is not None:
                failed.append((rel, item.error))
                skipped += 1
                continue
            image = np.asarray(item.image)
        names.append(label(rel))
        if not resizing and images and image.shape != images[0].shape:
            _check_resizable(source, size, (images[0].shape, rels[0]), (image.shape, rel))
            resizing = True  # from here on every image is stored at size x size: memory stays one split's
            images = [resize_array(im, size) for im in images]  # type: ignore[arg-type]
        images.append(resize_array(image, size) if resizing else image)  # type: ignore[arg-type]
        rels.append(rel)
    if skipped:
        log.warning(
            "%s%s: %d unreadable image(s) left out (named when the run ends)",
            where,
            f" {split}/" * bool(split),
            skipped,
        )
    if not images:
        raise ValueError(f"{where}: no images found" + (f" under {split}/" if split else ""))
    if resizing:
        log.info(
            "%s%s: images of several sizes, resized to %dx%d at load", where, f" {split}/" * bool(split), size, size
        )
    return np.stack(images), names, rels, resizing


def _check_resizable(source: Source, size: int | None, first: tuple[tuple, str], other: tuple[tuple, str]) -> None:
    """Images of several sizes: fine for plain images with a size to resize to, else one line saying why not."""
    (s1, r1), (s2, r2) = first, other
    seen = f"{r1} is {s1[1]}x{s1[0]}, {r2} is {s2[1]}x{s2[0]}"
    if source.encrypted:
        raise ValueError(
            f"encrypted dataset {source.path}: images of several sizes ({seen}); ciphertext is never resized"
        )
    if size is None:
        raise ValueError(f"{source.path}: images of several sizes ({seen}); give the input size to resize them to")


def _cache_file(source: Source, split: str | None, size: int | None = None) -> Path | None:
    """Where a split's decoded pixels are cached (None: the cache is off, or the source holds arrays already);
    ``size``: of images of several sizes resized to it at load (None: the cache of images kept as they are)."""
    folder = decoded_cache() if source.cache_decoded else None
    if folder is None:
        return None
    name = Path(str(source.path).split("{")[0]).name or "source"
    resized = f"-{size}px" if size else ""
    return folder / f"{name}-{split or 'all'}{resized}-{source.identity()}.npz"


def test_images(
    data: str | os.PathLike | None, n: int, size: int | None = None, splits: SplitNames | None = None
) -> np.ndarray:
    """``n`` images of ``data`` (CIFAR-10 by default) as NHWC uint8, class-balanced, a fixed choice: audit material.

    From the test split as training and eval find it (:func:`find_test_split`: ``--splits``, else test/,
    validation/, ...), else from the whole source (every split, or a folder of photos in any layout:
    an audit trains nothing, so nothing is held out); exactly ``n`` whenever it holds ``n``. Plain
    images of several sizes are resized to ``size`` as for training. They come in a fixed random
    order (not grouped by class), so that any leading part of them (an attacker's images) and the
    rest (held-out ones) both mix the classes.
    """
    source = open_source(resolve_data(data), splits=splits)
    where = source.path or "CIFAR-10"
    test = find_test_split(source, size)
    if test is not None:
        ds = load_source_split(source, test, size=size)
    else:
        log.info("%s: no test split; the audit takes its images from the whole source", where)
        images, names, _, _ = _decode_images(source, None, size, class_of, None)
        classes = tuple(sorted(set(names)))
        ds = ArrayDataset(images, np.array([classes.index(c) for c in names], dtype=np.int64), classes)
    if n > len(ds):
        raise ValueError(f"{where}: {len(ds)} images, {n} needed")
    images = stratified_subset(ds, n, seed=0).images
    return images[np.random.default_rng(0).permutation(len(images))]


def split_train_val(ds: ArrayDataset, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A stratified, seeded validation split for model selection (the test set stays untouched)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(ds.labels == c)
        val.append(rng.permutation(idx)[: round(len(idx) * val_fraction)])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(ds)), val_idx)
    return ds.subset(train_idx), ds.subset(val_idx)


def stratified_subset(ds: ArrayDataset, n: int, seed: int) -> ArrayDataset:
    """Exactly ``n`` images with the class balance of ``ds``, chosen with ``seed``.

    Each class gets its share rounded; what rounding leaves over or takes too many goes to (or
    comes from) the classes whose shares rounding moved most, so one image per class or an ``n``
    that does not divide still gives ``n``. Where rounding already gives ``n`` the choice is as it
    always was.
    """
    if n >= len(ds):
        return ds
    sizes = np.bincount(ds.labels, minlength=len(ds.classes))
    share = n / len(ds) * sizes
    quota = np.array([round(s) for s in share])
    gap = n - int(quota.sum())
    order = np.argsort(quota - share if gap > 0 else share - quota, kind="stable")  # most short (or over) first
    for c in order[: abs(gap)]:
        quota[c] += np.sign(gap)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(ds.labels == c))[: quota[c]] for c in range(len(ds.classes))]
    return ds.subset(np.sort(np.concatenate(keep)))


def take_part(ds: ArrayDataset, part: str) -> ArrayDataset:
    """Part ``"i/k"``: the i-th of k disjoint stratified parts (fixed split, independent of run seeds).

    Upstream pretraining on part 0/2 and downstream fine-tuning on part 1/2 never share an image.
    """
    try:
        i, k = (int(v) for v in part.split("/"))
        if not 0 <= i < k:
            raise ValueError
    except ValueError:
        raise ValueError(f"part must be 'i/k' with 0 <= i < k, got {part!r}") from None
    rng = np.random.default_rng(20_260_000 + k)  # one fixed partition per k
    keep = [np.array_split(rng.permutation(np.flatnonzero(ds.labels == c)), k)[i] for c in range(len(ds.classes))]
    return ds.subset(np.sort(np.concatenate(keep)))


@dataclass
class DataSplits:
    """Train (for fitting), val (for choosing the epoch) and test (for the final report only)."""

    train: ArrayDataset | ShardStream
    val: ArrayDataset | ShardStream
    test: ArrayDataset | ShardStream
    manifest: Manifest | None = None  # set when the data arrive encrypted (``ppvit encrypt`` output)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, problem) of images left out

    @property
    def encrypted(self) -> bool:
        return self.manifest is not None


def load_splits(
    data: str | os.PathLike | None,
    val_fraction: float,
    seed: int,
    part: str | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    columns: Columns | None = None,
    loader_workers: int = 0,
    size: int | None = None,
    splits: SplitNames | None = None,
    strict: bool = True,
) -> DataSplits:
    """The run's data: ``data`` (else $PPVIT_CIFAR10, else CIFAR-10 downloaded) with ``train`` and ``test`` splits.

    A folder written by ``ppvit encrypt`` (it holds a manifest) gives encrypted splits;
    the caller checks the manifest against its scheme, block size, input size and key.
    WebDataset output of ``ppvit encrypt --format wds`` is streamed (:class:`ShardStream`,
    read by ``loader_workers`` processes), never loaded whole. ``size``: the run's input size, that plain
    images of several sizes are resized to at load (:func:`load_source_split`). ``splits``: which of the
    source's splits are train and test, where it names them otherwise (:class:`SplitNames`). An image that
    does not decode stops the load (``strict``), or is left out and listed in ``unreadable``.
    """
    source = open_source(resolve_data(data), columns, splits)
    if isinstance(source, EncryptedWds):
        from ppvit.data.streaming import ShardStream, is_val

        if part or train_subset or test_subset:
            raise ValueError(f"{source.path}: streamed WebDataset data take no --part, --train-subset or --test-subset")
        if not 0 < val_fraction < 1:
            raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
        classes, shards = tuple(source.split_classes("train")), source.shard_files("train")
        train = ShardStream(shards, classes, lambda k: not is_val(k, val_fraction), loader_workers, str(source.path))
        val = ShardStream(shards, classes, lambda k: is_val(k, val_fraction), loader_workers, str(source.path))
        return DataSplits(train, val, _stream_split(source, "test", loader_workers), source.manifest)
    unreadable: list[tuple[str, str]] = []
    full, test = _train_and_test(source, size, failed=None if strict else unreadable)
    if part:
        full = take_part(full, part)
    if train_subset:
        full = stratified_subset(full, train_subset, seed)
    if test_subset:
        test = stratified_subset(test, test_subset, 0)
    train, val = split_train_val(full, val_fraction, seed)
    return DataSplits(train, val, test, source.manifest, unreadable)


def load_test_split(
    data: str | os.PathLike | None,
    subset: int | None = None,
    columns: Columns | None = None,
    size: int | None = None,
    splits: SplitNames | None = None,
) -> tuple[ArrayDataset | ShardStream, Manifest | None]:
    """The test split alone (evaluating an adapter decodes nothing else), with the manifest if encrypted;
    ``size`` and ``splits`` as for :func:`load_splits`."""
    source = open_source(resolve_data(data), columns, splits)
    if isinstance(source, EncryptedWds):
        if subset:
            raise ValueError(f"{source.path}: streamed WebDataset data take no test subset")
        return _stream_split(source, "test", 0), source.manifest
    test = _train_and_test(source, size, train=False)[1]
    return (stratified_subset(test, subset, 0) if subset else test), source.manifest


TEST_NAMES = ("test", "validation", "valid", "val", "dev")  # a test split's names, the first found is taken
HELD_OUT = 0.2  # of each class: the test split of a source without train/ and test/ folders


def has_split(source: Source, split: str, size: int | None = None) -> bool:
    """Whether ``source`` holds ``split`` (after ``--splits`` renamed it): the manifest's word, a cached split,
    else a scan that stops at the split's first image."""
    if source.manifest is not None:
        return split in source.manifest.classes
    if any(c is not None and c.exists() for c in (_cache_file(source, split), _cache_file(source, split, size))):
        return True
    return next(iter(source.paths(lambda rel: rel.startswith(f"{split}/"))), None) is not None


def find_test_split(source: Source, size: int | None = None) -> str | None:
    """The one rule for which split is the test split, for training, eval and the audit alike: the split
    ``--splits`` names (the source shows it as test/), else the first of ``TEST_NAMES`` the source holds;
    None when it holds none (training then holds ``HELD_OUT`` of each class out, the audit takes everything)."""
    test = next((n for n in TEST_NAMES if has_split(source, n, size)), None)
    if test not in (None, "test"):
        log.info("%s: no test/ split; %s/ is the test split", source.path or "CIFAR-10", test)
    return test


def _train_and_test(
    source: Source, size: int | None, train: bool = True, failed: list[tuple[str, str]] | None = None
) -> tuple[ArrayDataset | None, ArrayDataset]:
    """The train and test splits (train None when not wanted): the source's train/ and test/ (or validation/,
    val/...) splits, else the whole source as one split of class folders with ``HELD_OUT`` of each class
    held out as the test split (a fixed choice: train and eval hold out the same images). ``failed``: as for
    :func:`load_source_split`."""
    where = source.path or "CIFAR-10"
    test = find_test_split(source, size)
    if not train and test is not None:  # evaluating: a test split alone will do
        return None, load_source_split(source, test, size=size, failed=failed)
    if has_split(source, "train", size):
        if test is None:
            raise ValueError(f"{where}: a train/ split but no test/ (nor {', '.join(TEST_NAMES[1:])}) split")
        return (load_source_split(source, "train", size=size, failed=failed) if train else None), load_source_split(
            source, test, size=size, failed=failed
        )
    if test is not None:
        raise ValueError(f"{where}: a {test}/ split but no train/ split")
    whole = load_source_split(source, None, size=size, failed=failed)
    log.info(
        "%s: no train/ and test/ folders: one split of %d images in %d classes, %d%% of each class held out "
        "as the test split (a fixed choice)",
        where,
        len(whole),
        len(whole.classes),
        round(100 * HELD_OUT),
    )
    return split_train_val(whole, HELD_OUT, seed=0)


def _stream_split(source: EncryptedWds, split: str, workers: int) -> ShardStream:
    from ppvit.data.streaming import ShardStream

    classes = tuple(source.split_classes(split))
    return ShardStream(source.shard_files(split), classes, None, workers, str(source.path))
