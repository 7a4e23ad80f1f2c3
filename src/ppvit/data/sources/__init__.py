"""Where images come from: every kind of source behind one interface, chosen once from the path.

:func:`open_source` returns a :class:`~ppvit.data.sources.base.Source` of the first kind in
``KINDS`` that claims the path:

- ``cifar10``: the name ``cifar10``, CIFAR-10 downloaded (:mod:`~ppvit.data.sources.cifar10`);
- ``encrypted-wds``, ``encrypted-npz``, ``encrypted-png``: a folder written by ``ppvit encrypt``
  (its manifest names the format; ``ppvit decrypt`` output is ``encrypted-png`` with scheme ``plain``);
- ``hf``: a Hugging Face dataset (``save_to_disk`` folder, parquet files) (:mod:`~ppvit.data.sources.hf`);
- ``wds``: WebDataset shards: a ``.tar`` of ``KEY.jpg`` + ``KEY.cls``, a folder of them, a brace
  pattern (:mod:`~ppvit.data.sources.wds`);
- ``files``: a folder tree in ImageFolder layout, a tar/tar.gz of one, a single image
  (:mod:`~ppvit.data.sources.files`).

Every source yields the same items: ``(path in ImageFolder layout [split/]class/name, data)``,
with ``splits`` (:class:`~ppvit.data.sources.base.SplitNames`, ``--splits train=training,test=holdout``)
applied to every kind alike (the two chosen splits alone, named ``train`` and ``test``), so
encrypting, training and previews work on each kind alike, and the encrypted copy of any source is
an ImageFolder tree (or shards) of PNGs. Damaged or missing containers (a truncated shard, a parquet
file that is not one) stop a run in one line naming the file; a bad item in a good container (an
image that does not decode, a sample without a label) is a failed image, named and counted.
Importing this package imports no torch (PIL and numpy only); the ``webdataset`` (which does),
``datasets`` and ``torchvision`` are imported when a source of theirs is read. A new kind: one
module with a :class:`Source` subclass, one entry in ``KINDS``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ppvit.data.sources.base import (
    Columns,
    ImageItem,
    Item,
    Select,
    Source,
    SplitNames,
    class_of,
    decode,
    split_of,
)
from ppvit.data.sources.cifar10 import NAME as CIFAR10_NAME
from ppvit.data.sources.cifar10 import Cifar10Download
from ppvit.data.sources.encrypted_npz import EncryptedNpz
from ppvit.data.sources.encrypted_png import EncryptedPng
from ppvit.data.sources.encrypted_wds import EncryptedWds
from ppvit.data.sources.files import FilesSource
from ppvit.data.sources.hf import HFSource
from ppvit.data.sources.wds import WdsSource, is_pattern

KINDS: tuple[type[Source], ...] = (
    Cifar10Download,
    EncryptedWds,
    EncryptedNpz,
    EncryptedPng,
    HFSource,
    WdsSource,
    FilesSource,
)
"""The registry, in the order kinds are tried: the first that claims a path reads it."""

__all__ = [
    "KINDS",
    "Columns",
    "ImageItem",
    "Item",
    "Select",
    "Source",
    "SplitNames",
    "class_of",
    "decode",
    "open_source",
    "split_of",
]


def open_source(
    path: str | os.PathLike | Source | None, columns: Columns | None = None, splits: SplitNames | None = None
) -> Source:
    """The source at ``path`` (None: CIFAR-10 downloaded), read with ``splits`` as ppvit's train and test
    (checked here: they exist); one line saying so when nothing is there or reads it."""
    if isinstance(path, Source):
        return path
    text = CIFAR10_NAME if path is None else str(path)
    if text != CIFAR10_NAME and not is_pattern(text) and not Path(text).exists():
        raise FileNotFoundError(f"source {text}: not found")
    for kind in KINDS:
        if kind.claims(text):
            source = kind(text, columns, splits)
            source.check_splits()
            return source
    raise ValueError(f"source {text}: not an image, a folder of images, a tar archive, a dataset or shards")
