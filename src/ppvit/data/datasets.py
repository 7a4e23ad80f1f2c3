"""Datasets as in-memory uint8 arrays: loading a split, caching its decoded pixels, subsets and splits.

Small datasets (CIFAR-10 is 60,000 x 32 x 32 x 3 = 184 MB) are decoded once, cached as a
``.npz`` file, and held in memory as one uint8 array, so a CPU training run never waits
on JPEG decoding; :mod:`ppvit.data.pipeline` makes batches of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

from ppvit._io import atomic_write
from ppvit.data.dataset_io import load_encrypted_split, wds_shard_files
from ppvit.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from ppvit.data.sources import Columns, identity, iter_source_images
from ppvit.data.streaming import ShardStream, is_val

log = logging.getLogger(__name__)

CIFAR10_ENV = "PPVIT_CIFAR10"
CACHE_ENV = "PPVIT_CACHE"


@dataclass
class ArrayDataset:
    """Images as one uint8 NHWC array with integer labels (batches are gathered by index)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 NHWC RGB, got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index], self.classes)


def cifar10_path(path: str | os.PathLike | None = None) -> Path | None:
    """The local CIFAR-10 copy: ``path``, else $PPVIT_CIFAR10; None means "download it"."""
    chosen = path or os.environ.get(CIFAR10_ENV)
    if not chosen or str(chosen) == "cifar10":
        return None
    p = Path(chosen)
    if not p.exists():
        raise FileNotFoundError(f"dataset {p}: not found")
    return p


def download_cifar10() -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 through torchvision, downloaded once into the cache (needs the network)."""
    root = cache_dir() / "torchvision"
    try:
        parts = [CIFAR10(str(root), train=train, download=True) for train in (True, False)]
    except Exception as exc:  # offline: URLError, socket errors, ...
        raise ValueError(
            f"CIFAR-10 download failed ({exc.__class__.__name__}); offline, pass --data PATH or set {CIFAR10_ENV} "
            "to a local copy (ImageFolder folder or tar)"
        ) from None
    return tuple(  # type: ignore[return-value]
        ArrayDataset(np.asarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64), tuple(d.classes))
        for d in parts
    )


def cache_dir() -> Path:
    """Where decoded datasets are cached: $PPVIT_CACHE or ~/.cache/ppvit."""
    d = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ppvit")
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_image_folder(src: str | os.PathLike, split: str | None = None, columns: Columns | None = None) -> ArrayDataset:
    """An ImageFolder tree (folder or tar/tar.gz), Hugging Face dataset or WebDataset shards
    (:mod:`ppvit.data.sources`) decoded into memory, cached by file identity.

    ``split`` selects a top-level folder (``train``/``test`` in the CIFAR-10 copy), a
    dataset's split, or the shards named for it. All images must share one size; resizing
    to the model input happens in the pipeline.
    """
    ident = identity(src, columns)
    name = Path(str(src).split("{")[0]).name or "source"
    cached = cache_dir() / f"{name}-{split or 'all'}-{ident}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return ArrayDataset(z["images"], z["labels"], tuple(z["classes"].tolist()))
    images, names = [], []
    select = None if split is None else lambda rel: rel.startswith(f"{split}/")
    for item in iter_source_images(src, select, columns):
        parts = Path(item.relpath).parts
        if split is not None:
            if parts[0] != split:
                continue
            parts = parts[1:]
        if len(parts) < 2:
            raise ValueError(f"{src}: {item.relpath} is not inside a class folder (ImageFolder layout)")
        if item.error is not None:
            raise ValueError(f"{src}: {item.relpath}: {item.error}")
        images.append(np.asarray(item.image.convert("RGB")))
        names.append(parts[0])
    if not images:
        raise ValueError(f"{src}: no images found" + (f" under {split}/" if split else ""))
    classes = tuple(sorted(set(names)))
    lookup = {c: i for i, c in enumerate(classes)}
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{src}: images of several sizes {sorted(shapes)[:3]}; encrypt with --size first")
    ds = ArrayDataset(np.stack(images), np.array([lookup[n] for n in names], dtype=np.int64), classes)
    _save_npz(cached, ds)
    return ds


def _save_npz(path: Path, ds: ArrayDataset) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=ds.images, labels=ds.labels, classes=np.array(ds.classes))

    atomic_write(path, write)


def test_images(data: str | os.PathLike | None, n: int) -> np.ndarray:
    """``n`` CIFAR-10 test images (class-balanced, fixed choice) as NHWC uint8: audit material.

    They come in a fixed random order (not grouped by class), so that any leading part of
    them (an attacker's images) and the rest (held-out ones) both mix the classes.
    """
    source = cifar10_path(data)
    ds = load_image_folder(source, "test") if source else download_cifar10()[1]
    if n > len(ds):
        raise ValueError(f"{source or 'CIFAR-10'}: {len(ds)} test images, {n} needed")
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
    """``n`` images with the class balance of ``ds`` (rounded), chosen with ``seed``."""
    if n >= len(ds):
        return ds
    frac = n / len(ds)
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.flatnonzero(ds.labels == c))[: round(frac * np.sum(ds.labels == c))]
        for c in range(len(ds.classes))
    ]
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
) -> DataSplits:
    """The run's data: ``data`` (else $PPVIT_CIFAR10, else CIFAR-10 downloaded) with ``train/`` and ``test/``.

    A folder written by ``ppvit encrypt`` (it holds a manifest) gives encrypted splits;
    the caller checks the manifest against its scheme, block size, input size and key.
    WebDataset output of ``ppvit encrypt --format wds`` is streamed (:class:`ShardStream`,
    read by ``loader_workers`` processes), never loaded whole.
    """
    src = cifar10_path(data)
    if src is not None and _is_wds_output(src):
        if part or train_subset or test_subset:
            raise ValueError(f"{src}: streamed WebDataset data take no --part, --train-subset or --test-subset")
        if not 0 < val_fraction < 1:
            raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
        manifest = read_manifest(src)
        classes = tuple(manifest.classes.get("train") or ())
        shards = wds_shard_files(src, "train")
        train = ShardStream(shards, classes, lambda k: not is_val(k, val_fraction), loader_workers, str(src))
        val = ShardStream(shards, classes, lambda k: is_val(k, val_fraction), loader_workers, str(src))
        test = _stream_split(src, "test", manifest, loader_workers)
        return DataSplits(train, val, test, manifest)
    if src is None:  # one download call gives both splits
        (full, test), manifest = download_cifar10(), None
    else:
        full, manifest = _load_split(data, "train", columns)
        test, _ = _load_split(data, "test", columns)
    if part:
        full = take_part(full, part)
    if train_subset:
        full = stratified_subset(full, train_subset, seed)
    if test_subset:
        test = stratified_subset(test, test_subset, 0)
    train, val = split_train_val(full, val_fraction, seed)
    return DataSplits(train, val, test, manifest)


def load_test_split(
    data: str | os.PathLike | None, subset: int | None = None, columns: Columns | None = None
) -> tuple[ArrayDataset | ShardStream, Manifest | None]:
    """The test split alone (evaluating an adapter decodes nothing else), with the manifest if encrypted."""
    src = cifar10_path(data)
    if src is not None and _is_wds_output(src):
        if subset:
            raise ValueError(f"{src}: streamed WebDataset data take no test subset")
        manifest = read_manifest(src)
        return _stream_split(src, "test", manifest, 0), manifest
    test, manifest = _load_split(data, "test", columns)
    return (stratified_subset(test, subset, 0) if subset else test), manifest


def _is_wds_output(src: Path) -> bool:
    return src.is_dir() and (src / MANIFEST_NAME).exists() and read_manifest(src).format == "wds"


def _stream_split(src: Path, split: str, manifest: Manifest, workers: int) -> ShardStream:
    classes = manifest.classes.get(split)
    if not classes:
        raise ValueError(f"encrypted dataset {src}: has no {split!r} split (it has {sorted(manifest.classes)})")
    return ShardStream(wds_shard_files(src, split), tuple(classes), None, workers, str(src))


def _load_split(
    data: str | os.PathLike | None, split: str, columns: Columns | None = None
) -> tuple[ArrayDataset, Manifest | None]:
    """One split of ``data`` (else $PPVIT_CIFAR10, else CIFAR-10 downloaded), and its manifest if encrypted."""
    src = cifar10_path(data)
    if src is None:
        return download_cifar10()[split == "test"], None
    if src.is_dir() and (src / MANIFEST_NAME).exists():
        images, labels, classes = load_encrypted_split(src, split)
        return ArrayDataset(images, labels, tuple(classes)), read_manifest(src)
    return load_image_folder(src, split, columns), None
