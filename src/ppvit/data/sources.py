"""Where plain images come from: ImageFolder trees and tar archives, Hugging Face datasets, WebDataset shards.

Every source is read as the same stream of ``(relative path, raw bytes or why they cannot be
read)`` that :mod:`ppvit.data.dataset_io` encrypts and :mod:`ppvit.data.datasets` decodes, with the
relative path in ImageFolder layout, ``[split/]class/name``. So the rest of ppvit (the
manifest's classes, resumable outputs, the splits, the demo's selection) works on each kind
alike, and an encrypted copy of any source is an ImageFolder tree (or shards) of PNGs.

- **files**: a folder tree of images, a tar/tar.gz archive of one, or a single image
  (:func:`ppvit.data.dataset_io.iter_image_bytes`).
- **hf**: a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder (a ``DatasetDict``'s
  splits, or one ``Dataset``), or parquet file(s) as on the Hub (``data/train-00000-of-00001.parquet``;
  the split is the file's or its folder's name). The image column is the ``Image`` feature and the
  label column the ``ClassLabel`` feature, unless named (``--image-column``, ``--label-column``).
  Paths are ``split/class/00000012.png`` (row number); class names are the ``ClassLabel``'s names,
  else the label values (integers zero-padded to 4 digits, so that they sort as numbers).
- **wds**: WebDataset shards: a ``.tar`` file whose samples are ``KEY.jpg|png|...`` with
  ``KEY.cls`` (the label, text), a folder of such shards, or a brace pattern
  (``shards/train-{000..009}.tar``). The split is the shard's folder or name prefix
  (``train/``, ``train-000.tar``). Paths are ``split/class/SHARD_KEY.jpg``.

Damaged or missing containers (a truncated shard, a parquet file that is not one) stop the run
in one line naming the file; a bad item in a good container (an image that does not decode, a
sample without a label) is a failed image, named and counted.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ppvit.data.dataset_io import _is_file, _is_image, class_of, decode, iter_image_bytes

Kind = Literal["files", "hf", "wds"]
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev")
WDS_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")
UNLABELLED = "_unlabelled_"
Select = Callable[[str], bool] | None


@dataclass(frozen=True)
class Columns:
    """Which columns of a Hugging Face dataset hold the image and the label (None: found by feature type)."""

    image: str | None = None
    label: str | None = None


def optional(module: str) -> Any:
    """An optional dependency (the ``data`` extra), or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"this source needs {module.split('.')[0]} (not installed): pip install 'ppvit[data]'"
        ) from None


# -- what a source is -------------------------------------------------------------------------------


def source_kind(src: str | os.PathLike) -> Kind:
    """``files``, ``hf`` or ``wds`` (see the module's docstring); raises FileNotFoundError for nothing there."""
    text = str(src)
    if _is_pattern(text):
        return "wds"
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"source {path}: not found")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf"
        if _parquet_files(path) and not _has_images(path):
            return "hf"
        if _tar_files(path) and not _has_images(path):
            return "wds"
        return "files"
    if path.suffix.lower() == ".parquet":
        return "hf"
    if _looks_like_wds_shard(path):
        return "wds"
    return "files"


def _is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def _has_images(folder: Path) -> bool:
    return any(_is_image(p.relative_to(folder).as_posix()) for p in folder.rglob("*"))


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet") if not any(s.startswith(".") for s in p.parts))


def _tar_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tar") if not p.name.startswith("."))


def _looks_like_wds_shard(path: Path) -> bool:
    """A tar archive whose first members include a ``.cls`` file: WebDataset, not an ImageFolder archive."""
    try:
        if not tarfile.is_tarfile(path):
            return False
        with tarfile.open(path, "r:*") as tar:
            for i, member in enumerate(tar):
                if member.name.endswith(".cls"):
                    return True
                if i >= 32:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return False  # iter_image_bytes names the damage
    return False


def identity(src: str | os.PathLike, columns: Columns | None = None) -> str:
    """A short hash of what a source is on disk (paths, sizes, times) and the columns read: the cache key."""
    kind = source_kind(src)
    if kind == "wds":
        files = wds_shards(src)
    elif kind == "hf" and Path(src).is_dir():
        files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    else:
        files = [Path(src)]
    parts = [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join([*parts, repr(columns)]).encode()).hexdigest()[:16]


def split_from_path(path: Path, root: Path | None = None) -> str:
    """The split a shard or parquet file belongs to: its folder's name, else its name's prefix, else ''."""
    for part in reversed(path.relative_to(root).parts[:-1] if root else path.parts[:-1][-1:]):
        if part in SPLIT_NAMES:
            return part
    stem = path.name.split(".")[0]
    for sep in ("-", "_"):
        stem = stem.split(sep)[0]
    return stem if stem in SPLIT_NAMES else ""


# -- reading any source -----------------------------------------------------------------------------


def iter_source_bytes(
    src: str | os.PathLike, select: Select = None, columns: Columns | None = None
) -> Iterator[tuple[str, bytes | OSError]]:
    """(relative path in ImageFolder layout, raw bytes or why they cannot be read) of every image of a source."""
    kind = source_kind(src)
    if kind == "hf":
        yield from _hf_items(src, select, columns or Columns(), read=True)
    elif kind == "wds":
        yield from _wds_items(src, select, read=True)
    else:
        yield from iter_image_bytes(src, select)


def iter_source_images(src: str | os.PathLike, select: Select = None, columns: Columns | None = None) -> Iterator:
    """Decoded images (:class:`~ppvit.data.dataset_io.ImageItem`) of any source, in a stable order."""
    for rel, data in iter_source_bytes(src, select, columns):
        yield decode(rel, data)


def source_paths(src: str | os.PathLike, select: Select = None, columns: Columns | None = None) -> Iterator[str]:
    """The relative paths alone (no image read where the source allows it): for a class list before writing."""
    kind = source_kind(src)
    if kind == "hf":
        yield from (rel for rel, _ in _hf_items(src, select, columns or Columns(), read=False))
    elif kind == "wds":
        yield from (rel for rel, _ in _wds_items(src, select, read=False))
    elif Path(src).is_dir():
        root = Path(src)
        for p in sorted(p for p in root.rglob("*") if _is_image(p.relative_to(root).as_posix()) and _is_file(p)):
            rel = p.relative_to(root).as_posix()
            if select is None or select(rel):
                yield rel
    else:
        yield from (rel for rel, _ in iter_image_bytes(src, select))


def source_classes(src: str | os.PathLike, select: Select = None, columns: Columns | None = None) -> list[str]:
    """Every class of every split, sorted: the label space written into WebDataset ``.cls`` members."""
    return sorted({class_of(rel) for rel in source_paths(src, select, columns)} - {UNLABELLED})


def _relpath(split: str, cls: str, name: str) -> str:
    return posixpath.join(*(p for p in (split, cls) if p), name)


def _safe_name(text: str) -> str:
    """A class or key as one path component: no separators, no leading dot, never '..'."""
    out = text.replace("/", "_").replace("\\", "_").strip() or "_"
    return "_" + out if out.startswith(".") else out


def _label_name(value: Any, names: list[str] | None) -> str | None:
    if value is None or (isinstance(value, int) and value < 0):
        return None
    if names is not None and isinstance(value, int):
        return _safe_name(names[value]) if value < len(names) else None
    if isinstance(value, int | float) and float(value).is_integer():
        return f"{int(value):04d}"
    return _safe_name(str(value))


# -- Hugging Face datasets ----------------------------------------------------------------------------


def _hf_splits(src: str | os.PathLike) -> list[tuple[str, Any, str]]:
    """(split, table-like, what to name in errors) per split: ``datasets`` Datasets or parquet files."""
    path = Path(src)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        datasets = optional("datasets")
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for damaged folders
            raise ValueError(f"Hugging Face dataset {path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            return [(name, loaded[name], str(path / name)) for name in sorted(loaded)]
        return [("", loaded, str(path))]
    files = _parquet_files(path) if path.is_dir() else [path]
    return [(split_from_path(f, path if path.is_dir() else None), f, str(f)) for f in files]


def _features(table: Any, where: str) -> Any:
    datasets = optional("datasets")
    if isinstance(table, Path):
        pq = optional("pyarrow.parquet")

        try:
            schema = pq.read_schema(table)
        except Exception as exc:  # pyarrow.ArrowInvalid and OSError for files that are not parquet
            raise ValueError(f"parquet file {where}: cannot be read ({exc.__class__.__name__}: {exc})") from None
        return datasets.Features.from_arrow_schema(schema)
    return table.features


def find_columns(features: Any, columns: Columns, where: str) -> tuple[str, str, list[str] | None]:
    """(image column, label column, ClassLabel names or None); one-line errors saying which flag to give."""
    datasets = optional("datasets")
    names = list(features)
    image = columns.image or next((c for c in names if isinstance(features[c], datasets.Image)), None)
    if image is None:
        raise ValueError(f"Hugging Face dataset {where}: no Image column among {names}; name one with --image-column")
    label = columns.label or next((c for c in names if isinstance(features[c], datasets.ClassLabel)), None)
    if label is None:
        label = next((c for c in ("label", "labels") if c in names), None)
    if label is None:
        raise ValueError(
            f"Hugging Face dataset {where}: no ClassLabel column among {names}; name one with --label-column"
        )
    for flag, col in (("--image-column", image), ("--label-column", label)):
        if col not in names:
            raise ValueError(f"Hugging Face dataset {where}: no column {col!r} ({flag}); it has {names}")
    feature = features[label]
    return image, label, list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _hf_rows(table: Any, image: str, label: str, read: bool, where: str) -> Iterator[tuple[Any, Any]]:
    """(image cell {bytes, path} or None, label value) per row, in order, without decoding images."""
    cols = [image, label] if read else [label]
    if isinstance(table, Path):
        pq = optional("pyarrow.parquet")
        try:
            for batch in pq.ParquetFile(table).iter_batches(batch_size=256, columns=cols):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    yield (data[image][i] if read else None), data[label][i]
        except OSError as exc:
            raise ValueError(f"parquet file {where}: damaged ({exc.__class__.__name__}: {exc})") from None
        except Exception as exc:  # pyarrow.ArrowInvalid for corrupt pages
            raise ValueError(f"parquet file {where}: damaged ({exc.__class__.__name__}: {exc})") from None
        return
    datasets = optional("datasets")
    view = table.select_columns(cols)
    if read:
        view = view.cast_column(image, datasets.Image(decode=False))
    for batch in view.iter(batch_size=256):
        for i in range(len(batch[label])):
            yield (batch[image][i] if read else None), batch[label][i]


def _hf_items(
    src: str | os.PathLike, select: Select, columns: Columns, read: bool
) -> Iterator[tuple[str, bytes | OSError | None]]:
    row_offset: dict[str, int] = {}  # parquet files of one split number their rows on from each other
    for split, table, where in _hf_splits(src):
        image, label, names = find_columns(_features(table, where), columns, where)
        for cell, value in _hf_rows(table, image, label, read, where):
            row = row_offset.get(split, 0)
            row_offset[split] = row + 1
            cls = _label_name(value, names)
            rel = _relpath(split, cls or UNLABELLED, f"{row:08d}.png")
            if select is not None and not select(rel):
                continue
            if not read:
                yield rel, None
            elif cls is None:
                yield rel, OSError(errno.ENODATA, f"no label ({label} is {value!r}) in {where}")
            else:
                yield rel, _cell_bytes(cell, Path(where))


def _cell_bytes(cell: Any, where: Path) -> bytes | OSError:
    """An Image cell's bytes (``{"bytes", "path"}``); a path-only cell is read relative to the dataset."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path") if isinstance(cell, dict) else None
    if not path:
        return OSError(errno.ENODATA, f"empty image cell in {where}")
    target = Path(path) if Path(path).is_absolute() else (where if where.is_dir() else where.parent) / path
    try:
        return target.read_bytes()
    except OSError as exc:
        return OSError(exc.errno, f"{target}: {exc.strerror}")


# -- WebDataset shards -----------------------------------------------------------------------------


def wds_shards(src: str | os.PathLike) -> list[Path]:
    """The shard files of a WebDataset source: a brace pattern, a folder of ``.tar`` files, or one file."""
    text = str(src)
    if _is_pattern(text):
        braceexpand = optional("braceexpand").braceexpand

        files = [Path(f) for pattern in braceexpand(text) for f in (sorted(glob.glob(pattern)) or [pattern])]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]}: not found ({len(missing)} of the pattern's {len(files)})")
        return files
    path = Path(text)
    return _tar_files(path) if path.is_dir() else [path]


def _wds_items(src: str | os.PathLike, select: Select, read: bool) -> Iterator[tuple[str, bytes | OSError | None]]:
    root = Path(src) if not _is_pattern(str(src)) and Path(src).is_dir() else None
    for shard in wds_shards(src):
        split = split_from_path(shard, root)
        for key, members in _wds_samples(shard):
            cls_data = members.get("cls")
            image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
            if image_ext is None:
                continue  # a sample with no image (metadata only) is not an image
            cls = None
            if isinstance(cls_data, bytes):
                try:
                    text = cls_data.decode("utf-8").strip()
                    cls = _label_name(int(text) if text.lstrip("-").isdigit() else text, None)
                except UnicodeDecodeError:
                    cls = None
            rel = _relpath(split, cls or UNLABELLED, f"{shard.name.split('.')[0]}_{_safe_name(key)}.{image_ext}")
            if select is not None and not select(rel):
                continue
            if not read:
                yield rel, None
            elif cls is None:
                why = "no .cls member" if cls_data is None else "its .cls is not a label"
                yield rel, OSError(errno.ENODATA, f"sample {key} of {shard}: {why}")
            else:
                yield rel, members[image_ext]


def _wds_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes | OSError]]]:
    """(key, {extension: bytes}) per sample: consecutive members sharing a key (WebDataset's grouping)."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                this = posixpath.join(posixpath.dirname(member.name).removeprefix("./"), stem)
                if this != key:
                    if key is not None:
                        yield key, members
                    key, members = this, {}
                members[ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield key, members
            if isinstance(tar.fileobj, io.BufferedReader) and shard.stat().st_size - tar.offset < 2 * tarfile.BLOCKSIZE:
                # Python's tarfile ends quietly at a truncated header; a whole tar ends in two zero blocks
                raise tarfile.ReadError(f"truncated after {tar.offset} bytes, no end-of-archive blocks")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"shard {shard}: damaged ({exc.__class__.__name__}: {exc})") from None


def describe(src: str | os.PathLike) -> str:
    """One line for logs: what kind of source this is."""
    return {"files": "image files", "hf": "Hugging Face dataset", "wds": "WebDataset shards"}[source_kind(src)]
