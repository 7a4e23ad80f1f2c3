"""What every source of images is: the :class:`Source` interface and the ImageFolder path conventions.

A source yields items ``(relative path, data)``: the path in ImageFolder layout,
``[split/]class/name``, whatever the source's own layout, so the rest of ppvit (the manifest's
classes, resumable outputs, the splits, the demo's selection) works on every kind alike; the
data are the raw bytes of an encoded image, the pixels themselves (uint8 HWC, for sources that
hold arrays), or the ``OSError`` saying why the image cannot be read (one failed image, not the
end of a run). Torch-free: PIL and numpy only.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ppvit._io import check_regular_file, read_regular_file
from ppvit.data.manifest import MANIFEST_NAME, PLAIN, Manifest, read_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev")
PPVIT_SPLITS = ("train", "test")  # the splits ppvit uses: train (validation is taken from it) and test
UNLABELLED = "_unlabelled_"  # the class folder of an image whose label is missing (a failed image)

Data = bytes | np.ndarray | OSError
Item = tuple[str, Data]
Select = Callable[[str], bool] | None


@dataclass(frozen=True)
class Columns:
    """Which columns of a Hugging Face dataset hold the image and the label (None: found by feature type), and the
    class names integer labels index (WebDataset ``.cls``, a label column that is no ``ClassLabel``; None: the
    numbers, zero-padded)."""

    image: str | None = None
    label: str | None = None
    classes: tuple[str, ...] | None = None


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """A ``--classes`` file: one class name per line, line i naming label i (blank lines skipped)."""
    try:
        names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"classes file {path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    if not names:
        raise ValueError(f"classes file {path}: no class names (one per line, line i naming label i)")
    if len(set(names)) != len(names):
        raise ValueError(f"classes file {path}: a class is named twice")
    return names


@dataclass(frozen=True)
class SplitNames:
    """Which split of a source is ppvit's train split and which its test split (``--splits``), for a source
    that names them otherwise (``training``/``holdout``) or holds several candidates (``validation`` and
    ``test``). A source read with them shows these two splits alone, renamed to ``train``/``test``, so
    every consumer (training, eval, ``ppvit encrypt``'s output) sees ppvit's own names; one not given is
    the split of ppvit's name."""

    train: str | None = None
    test: str | None = None

    def __post_init__(self) -> None:
        if not self.given():
            raise ValueError("--splits: name a split, e.g. train=training,test=holdout")
        if self.source("train") == self.source("test"):
            raise ValueError(f"--splits {self}: train and test name the same split")

    @classmethod
    def parse(cls, text: str) -> SplitNames:
        """``train=training,test=holdout`` (either pair alone); anything else is one line saying what is expected."""
        given: dict[str, str] = {}
        for pair in text.split(","):
            ours, sep, theirs = (part.strip() for part in pair.partition("="))
            if ours not in PPVIT_SPLITS or not sep or not theirs or ours in given:
                why = f"{ours!r} is not a ppvit split" if sep and ours not in PPVIT_SPLITS else f"bad pair {pair!r}"
                raise ValueError(
                    f"--splits {text!r}: {why}; expected train=SPLIT,test=SPLIT (ppvit's splits: "
                    f"{', '.join(PPVIT_SPLITS)}), e.g. train=training,test=holdout"
                )
            given[ours] = theirs
        return cls(**given)

    @classmethod
    def of(cls, value: SplitNames | str | dict[str, str] | None) -> SplitNames | None:
        """From any spelling a setting arrives in: a flag's text, a ``config.yaml`` mapping, or the value."""
        if value is None or isinstance(value, SplitNames):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict) and set(value) <= set(PPVIT_SPLITS):
            return cls(**value)
        raise ValueError(f"splits: expected train=SPLIT,test=SPLIT or a mapping of train/test, got {value!r}")

    def __str__(self) -> str:
        return ",".join(f"{ours}={theirs}" for ours, theirs in self.given().items())

    def given(self) -> dict[str, str]:
        """ppvit split -> the source's split, for the names given."""
        return {ours: theirs for ours in PPVIT_SPLITS if (theirs := getattr(self, ours)) is not None}

    def source(self, split: str) -> str:
        """The source's name of ppvit's ``split``."""
        return getattr(self, split) or split

    def view(self, relpath: str) -> str | None:
        """``relpath`` as ppvit sees it: its split renamed to ppvit's, None when its split is neither chosen."""
        split = split_of(relpath)
        ours = next((s for s in PPVIT_SPLITS if split and split == self.source(s)), None)
        return None if ours is None else ours + relpath[len(split) :]


@dataclass
class ImageItem:
    """One source image: its path relative to the source, and the decoded image or an error."""

    relpath: str
    image: Image.Image | None = None
    error: str | None = None


MAX_IMAGE_BYTES = 256 << 20  # one image file read into memory (a 8192x8192 RGB image stored raw is 192 MiB)


def check_image_file(path: str | os.PathLike) -> None:
    """OSError unless ``path`` is a regular file of at most ``MAX_IMAGE_BYTES`` (see :func:`check_regular_file`)."""
    check_regular_file(path, MAX_IMAGE_BYTES, "an image")


def read_image_file(path: str | os.PathLike) -> bytes:
    """An image file's bytes, or OSError (:func:`check_image_file`)."""
    return read_regular_file(path, MAX_IMAGE_BYTES, "an image")


def decode(relpath: str, data: Data) -> ImageItem:
    """Decode to RGB; an unreadable or corrupt file becomes an item with an error, not an exception."""
    if isinstance(data, OSError):
        return ImageItem(relpath, error=f"cannot read ({data.strerror or data})")
    if isinstance(data, np.ndarray):
        return ImageItem(relpath, Image.fromarray(data))
    buf = io.BytesIO(data)
    try:
        with Image.open(buf) as im:
            if im.mode in WIDE_MODES and not _sixteen_bits(im):
                why = (
                    f"mode {im.mode} ({WIDE_MODES[im.mode]} pixels) has no one scale to 8 bits; save it as 8 or 16 bits"
                )
                return ImageItem(relpath, error=why)
            return ImageItem(relpath, _rgb(im))
    except Exception as exc:  # PIL raises many types for bad files
        detail = str(exc).replace(repr(buf), repr(Path(relpath).name))  # PIL names its buffer, "<_io.BytesIO ...>"
        return ImageItem(relpath, error=f"cannot decode ({exc.__class__.__name__}: {detail})")


WIDE_MODES = {"I": "32-bit integer", "F": "32-bit floating point"}  # PIL's convert("RGB") clips them: black, white


def _sixteen_bits(im: Image.Image) -> bool:
    """16-bit grey: ``I;16*``, or ``I`` from a PNG (no PNG is 32-bit grey; Pillow before 10.3 opened 16-bit ones so)."""
    return im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")


def _rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; 16-bit grey (``I;16``, ``I;16B``, ...) scaled, value / 257 rounded (65535 is 255), where
    PIL's convert clips it at 255 (a 16-bit PNG came out almost all white)."""
    if _sixteen_bits(im):
        wide = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def class_of(relpath: str) -> str:
    """The ImageFolder class: the folder holding the file ('' for a file at the top)."""
    parts = Path(relpath).parts
    return parts[-2] if len(parts) >= 2 else ""


def split_of(relpath: str) -> str:
    """The split folder above the class folder ('' when there is none)."""
    parts = Path(relpath).parts
    return parts[0] if len(parts) >= 3 else ""


def is_image_path(relpath: str) -> bool:
    """An image suffix, and no hidden part (``.x``, macOS ``._x.jpg`` resource forks are not images)."""
    parts = Path(relpath).parts
    return Path(relpath).suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") and p != ".." for p in parts)


def has_images(folder: Path) -> bool:
    return any(is_image_path(p.relative_to(folder).as_posix()) for p in folder.rglob("*"))


def split_from_path(path: Path, root: Path | None = None, names: tuple[str, ...] = SPLIT_NAMES) -> str:
    """The split a shard or parquet file belongs to: its folder's name, else its name's prefix, else '';
    only ``names`` count as splits (a generic ``shard-000.tar`` is in none)."""
    for part in reversed(path.relative_to(root).parts[:-1] if root else path.parts[:-1][-1:]):
        if part in names:
            return part
    stem = path.name.split(".")[0]
    for sep in ("-", "_"):
        stem = stem.split(sep)[0]
    return stem if stem in names else ""


def label_name(value: Any, names: list[str] | None) -> str | None:
    """A label value as a class folder name (None: no label)."""
    if value is None or (isinstance(value, int) and value < 0):
        return None
    if names is not None and isinstance(value, int):
        return safe_name(names[value]) if value < len(names) else None
    if isinstance(value, int | float) and float(value).is_integer():
        return f"{int(value):04d}"
    return safe_name(str(value))


def safe_name(text: str) -> str:
    """A class or key as one path component: no separators, no leading dot, never '..'."""
    out = text.replace("/", "_").replace("\\", "_").strip() or "_"
    return "_" + out if out.startswith(".") else out


def optional(module: str) -> Any:
    """An optional dependency (the ``data`` extra), or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"this source needs {module.split('.')[0]} (not installed): pip install 'ppvit[data]'"
        ) from None


class Source(ABC):
    """A way of reading images; one subclass per kind, chosen from the path by :func:`ppvit.data.sources.open_source`.

    A new kind is one module with a subclass (``kind``, :meth:`claims`, :meth:`_items`,
    :meth:`files`) and one entry in the registry's ``KINDS``. Its paths name the splits as the source
    does; :meth:`items` and :meth:`paths` apply ``splits`` (:class:`SplitNames`) to every kind alike.
    """

    kind: ClassVar[str]
    cache_decoded: ClassVar[bool] = True  # loading a split caches its decoded pixels (not for arrays already)
    manifest: Manifest | None = None  # an encrypted (or decrypted) dataset's: what it is and its classes

    def __init__(
        self, path: str | os.PathLike, columns: Columns | None = None, splits: SplitNames | None = None
    ) -> None:
        self.path = path
        self.columns = columns or Columns()
        self.splits = splits

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @classmethod
    @abstractmethod
    def claims(cls, path: str) -> bool:
        """Whether ``path`` (as given: a path, a brace pattern, a name) is this kind; cheap, never raises."""

    @abstractmethod
    def _items(self, select: Select = None) -> Iterator[Item]:
        """(relative path in ImageFolder layout, data) of every image (that ``select`` accepts), in a stable order,
        its split named as the source names it."""

    @abstractmethod
    def files(self) -> list[Path]:
        """What the source is on disk, for :meth:`identity` (sizes and times of these files)."""

    def _paths(self, select: Select = None) -> Iterator[str]:
        """The relative paths alone; kinds that can list them without reading images do so."""
        return (rel for rel, _ in self._items(select))

    def items(self, select: Select = None) -> Iterator[Item]:
        """(relative path in ImageFolder layout, data) of every image (that ``select`` accepts), in a stable order;
        with ``splits``, the two chosen splits alone under ppvit's names. A path that would leave a folder it is
        joined to stops the run (see :meth:`_safe`)."""
        if self.splits is None:
            found = self._items(select)
        else:
            view = self.splits.view
            found = ((ours, data) for rel, data in self._items(self._viewed(select)) if (ours := view(rel)) is not None)
        return ((self._safe(rel), data) for rel, data in found)

    def paths(self, select: Select = None) -> Iterator[str]:
        """The relative paths of :meth:`items` alone."""
        if self.splits is None:
            found = self._paths(select)
        else:
            found = (ours for rel in self._paths(self._viewed(select)) if (ours := self.splits.view(rel)) is not None)
        return map(self._safe, found)

    def _safe(self, rel: str) -> str:
        """``rel``, refused where it is absolute or climbs (``..``): outputs are written under these paths (decrypt,
        the audit's recovered images), and a tar member's, an npz shard's or a sample's path is whatever its
        writer put there (a shard's ``/home/x/.bashrc`` was written there by ``ppvit decrypt``)."""
        path = PurePosixPath(rel)
        if not rel or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"source {self.path}: {rel!r} is an unsafe path (absolute, or with '..'); refusing it")
        return rel

    def _viewed(self, select: Select) -> Select:
        """``select`` for the kind's own paths: a path in a chosen split that ``select`` accepts as ppvit names it."""
        view = self.splits.view  # type: ignore[union-attr]
        return lambda rel: (ours := view(rel)) is not None and (select is None or select(ours))

    def split_names(self) -> tuple[str, ...]:
        """What a shard's or parquet file's folder or name prefix is read as a split by: the usual names and
        those ``splits`` gives."""
        return SPLIT_NAMES + (tuple(self.splits.given().values()) if self.splits else ())

    def check_splits(self) -> None:
        """The splits ``splits`` names exist: else one line naming those that do, before any work."""
        if self.splits is None:
            return
        if self.manifest is not None:
            raise ValueError(
                f"{self.path}: written by ppvit (splits {', '.join(sorted(self.manifest.classes))}); --splits is for "
                "the source it was encrypted from"
            )
        for ours, theirs in self.splits.given().items():
            if next(iter(self._paths(lambda rel, s=theirs: split_of(rel) == s)), None) is None:
                have = sorted({split_of(rel) for rel in self._paths()} - {""})
                raise ValueError(
                    f"source {self.path}: no split {theirs!r} (--splits {ours}={theirs}); its splits: "
                    f"{', '.join(have) or 'none found'}"
                )

    def count(self, select: Select = None) -> int | None:
        """How many images, where the kind lists them without reading image data (a progress bar's total);
        None: not known without reading them all."""
        return None if type(self)._paths is Source._paths else sum(1 for _ in self.paths(select))

    def images(self, select: Select = None) -> Iterator[ImageItem]:
        """Decoded images (see :func:`decode`), in the order of :meth:`items`."""
        return (decode(rel, data) for rel, data in self.items(select))

    @property
    def encrypted(self) -> bool:
        return self.manifest is not None and self.manifest.scheme != PLAIN

    def check_plain(self, verb: str) -> None:
        """ValueError where this source is ciphertext: ``verb`` (encrypt, preview) encrypted it again, exit 0."""
        m = self.manifest
        if m is not None and self.encrypted:
            raise ValueError(
                f"source {self.path}: is ciphertext (its {MANIFEST_NAME}: scheme {m.scheme}, key {m.key_fingerprint}); "
                f"{verb} takes plain images: `ppvit decrypt` is the verb for it"
            )

    def identity(self) -> str:
        """A short hash of what the source is on disk (paths, sizes, times), the columns and the splits read:
        a cache key."""
        known = getattr(self, "_identity", None)  # once per source object: a folder's every file is stat'ed
        if known is None:
            parts = [f"{os.path.abspath(p)}|{_stamp(p)}" for p in self.files()]  # not resolve(): 2 s a 50,000 files
            read = [repr(self.columns)] + ([repr(self.splits)] if self.splits else [])  # no mapping: keys as before
            known = self._identity = hashlib.sha256("\n".join([*parts, *read]).encode()).hexdigest()[:16]
        return known

    def known_classes(self, split: str) -> list[str] | None:
        """The class list labels index, where the source records one (a manifest); None: the classes found."""
        return self.manifest.classes.get(split) if self.manifest is not None else None

    def splits_and_classes(self, select: Select = None) -> tuple[list[str], list[str]]:
        """The splits ('' for images outside a split folder) and every class of every split, sorted:
        the manifest's, else (or with ``select``) one pass over :meth:`paths` (a shard source reads its data)."""
        if self.manifest is not None and self.manifest.classes and select is None:
            listed = self.manifest.classes
            return sorted(listed), sorted({c for split in listed.values() for c in split})
        rels = list(self.paths(select))
        return sorted({split_of(r) for r in rels}), sorted({class_of(r) for r in rels} - {UNLABELLED})


def _stamp(path: Path) -> str:
    """Size and time of a file (of the link itself where its target is gone: a broken link is a failed image)."""
    try:
        st = path.stat()
    except OSError:
        st = path.lstat()
    return f"{st.st_size}|{st.st_mtime_ns}"


class EncryptedFolder(Source):
    """What the three kinds of ``ppvit encrypt`` output share: a folder with a manifest naming ``format``,
    read once; the manifest is the folder's identity (rewritten at the end of every run that changes it)."""

    format: ClassVar[str]

    def __init__(
        self, path: str | os.PathLike, columns: Columns | None = None, splits: SplitNames | None = None
    ) -> None:
        super().__init__(path, columns, splits)
        self.manifest = read_manifest(path)

    @classmethod
    def claims(cls, path: str) -> bool:
        return manifest_format(path) == cls.format

    def files(self) -> list[Path]:
        return [Path(self.path) / MANIFEST_NAME]


def manifest_format(path: str) -> str | None:
    """The format a folder's ``ppvit encrypt`` manifest names (None: no manifest there); for the encrypted kinds."""
    p = Path(path)
    if not (p / MANIFEST_NAME).is_file():
        return None
    return read_manifest(p).format
