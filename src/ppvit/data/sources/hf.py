"""Hugging Face ``datasets``: a ``save_to_disk`` folder (a ``DatasetDict``'s splits, or one ``Dataset``), or
parquet file(s) as on the Hub (``data/train-00000-of-00001.parquet``; the split is the file's or its folder's name).

The image column is the ``Image`` feature and the label column the ``ClassLabel`` feature, unless
named (``--image-column``, ``--label-column``). Paths are ``split/class/00000012.png`` (row
number); class names are the ``ClassLabel``'s names, else the label values (integers zero-padded
to 4 digits, so that they sort as numbers). Parquet is read batch by batch with pyarrow. Needs the
``data`` extra (``datasets``, ``pyarrow``), imported when a dataset is read.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from ppvit.data.sources.base import (
    UNLABELLED,
    Columns,
    Item,
    Select,
    Source,
    has_images,
    label_name,
    optional,
    read_image_file,
    split_from_path,
)


class HFSource(Source):
    """A Hugging Face dataset on disk, read row by row without decoding images."""

    kind: ClassVar[str] = "hf"

    @classmethod
    def claims(cls, path: str) -> bool:
        p = Path(path)
        if p.is_dir():
            return _saved(p) or (bool(parquet_files(p)) and not has_images(p))
        return p.suffix.lower() == ".parquet" and p.exists()

    def files(self) -> list[Path]:
        p = Path(self.path)
        return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]

    def _items(self, select: Select = None) -> Iterator[Item]:
        yield from self._rows(select, read=True)  # type: ignore[misc]

    def _paths(self, select: Select = None) -> Iterator[str]:
        return (rel for rel, _ in self._rows(select, read=False))

    def _rows(self, select: Select, read: bool) -> Iterator[tuple[str, Any]]:
        row_offset: dict[str, int] = {}  # parquet files of one split number their rows on from each other
        root = Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent  # what path cells may name
        for split, table, where in _splits(Path(self.path), self.split_names()):
            image, label, names = find_columns(_features(table, where), self.columns, where)
            names = names or (list(self.columns.classes) if self.columns.classes else None)
            for cell, value in _table_rows(table, image, label, read, where):
                row = row_offset.get(split, 0)
                row_offset[split] = row + 1
                cls = label_name(value, names)
                rel = posixpath.join(*(p for p in (split, cls or UNLABELLED) if p), f"{row:08d}.png")
                if select is not None and not select(rel):
                    continue
                if not read:
                    yield rel, None
                elif cls is None:
                    yield rel, OSError(errno.ENODATA, f"no label ({label} is {value!r}) in {where}")
                else:
                    yield rel, _cell_bytes(cell, Path(where), root)


def _saved(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def parquet_files(folder: Path) -> list[Path]:
    # hidden parts below the folder only: `../hf-parquet`'s ".." is no hidden folder
    return sorted(
        p for p in folder.rglob("*.parquet") if not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )


def _splits(path: Path, names: tuple[str, ...]) -> list[tuple[str, Any, str]]:
    """(split, table-like, what to name in errors) per split: ``datasets`` Datasets, or parquet files (whose
    folder or name prefix is a split when among ``names``)."""
    if path.is_dir() and _saved(path):
        datasets = optional("datasets")
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for damaged folders
            raise ValueError(f"Hugging Face dataset {path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            return [(name, loaded[name], str(path / name)) for name in sorted(loaded)]
        return [("", loaded, str(path))]
    files = parquet_files(path) if path.is_dir() else [path]
    return [(split_from_path(f, path if path.is_dir() else None, names), f, str(f)) for f in files]


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


def _table_rows(table: Any, image: str, label: str, read: bool, where: str) -> Iterator[tuple[Any, Any]]:
    """(image cell {bytes, path} or None, label value) per row, in order, without decoding images."""
    cols = [image, label] if read else [label]
    if isinstance(table, Path):
        pq = optional("pyarrow.parquet")
        try:
            for batch in pq.ParquetFile(table).iter_batches(batch_size=256, columns=cols):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    yield (data[image][i] if read else None), data[label][i]
        except Exception as exc:  # OSError, pyarrow.ArrowInvalid for corrupt pages
            raise ValueError(f"parquet file {where}: damaged ({exc.__class__.__name__}: {exc})") from None
        return
    datasets = optional("datasets")
    view = table.select_columns(cols)
    if read:
        view = view.cast_column(image, datasets.Image(decode=False))
    for batch in view.iter(batch_size=256):
        for i in range(len(batch[label])):
            yield (batch[image][i] if read else None), batch[label][i]


def _cell_bytes(cell: Any, where: Path, root: Path) -> bytes | OSError:
    """An Image cell's bytes (``{"bytes", "path"}``); a path-only cell is read relative to the dataset's file, from
    under the dataset's folder ``root`` only: a path out of it (``../../x``, ``/home/me/x``) put a local file that is
    none of the dataset's into the output. Absolute paths under ``root`` are read (``Dataset.to_parquet`` writes
    them); the check is on the path's text, so links inside the folder (the Hub cache's blobs) are followed."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path") if isinstance(cell, dict) else None
    if not path:
        return OSError(errno.ENODATA, f"empty image cell in {where}")
    target = Path(os.path.normpath((where if where.is_dir() else where.parent).absolute() / path))
    if not target.is_relative_to(os.path.normpath(root.absolute())):
        return OSError(errno.EXDEV, f"image path {path!r} in {where}: outside the dataset's folder {root}, not read")
    try:
        return read_image_file(target)
    except OSError as exc:
        return OSError(exc.errno, f"{target}: {exc.strerror}")
