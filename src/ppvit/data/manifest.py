"""The manifest of an encrypted dataset: what it is (scheme, block size, size, key fingerprint, format, dtype).

Every encrypted folder carries one (``ppvit-manifest.json``); decrypt, train and eval check
it before using the data. Each ciphertext PNG carries the same facts (never the key) in a PNG
text chunk, :data:`MARKER`, so that a file copied out of its folder is still known for
ciphertext and never encrypted twice. Torch-free, so the CLI's parser reads the format names cheaply.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ppvit._io import atomic_write_json, read_json
from ppvit.data.preprocess import Preprocess

MANIFEST_NAME = "ppvit-manifest.json"
SHARD_SIZE = 1024  # images per npz shard
WDS_SHARD_SIZE = 1000  # images per WebDataset shard unless --shard-size says otherwise
PLAIN = "plain"  # the scheme a decrypted folder's manifest names
Format = Literal["png", "npz", "wds"]
FORMATS = ("png", "npz", "wds")
OLD_FORMATS = {"npy": "npz"}  # manifests of the first release named the .npz shard format "npy"
DTYPES = ("uint8", "float16", "int16", "int32")  # of ciphertext: uint8, mix's float16, lift's integers
MARKER = "ppvit-ciphertext"  # the PNG text chunk of a ciphertext file: key fingerprint, scheme, block size, size


@dataclass
class Manifest:
    """What an encrypted dataset is; checked by decrypt and by training on it."""

    scheme: str
    block_size: int
    size: int | None
    key_fingerprint: str
    format: Format
    ppvit_version: str = ""
    classes: dict[str, list[str]] = field(default_factory=dict)  # split -> sorted class names
    counts: dict[str, int] = field(default_factory=dict)  # split -> images written
    complete: bool = False
    shard_size: int | None = None  # wds: images per shard (dealt round-robin over up to 64 shards: data.sinks.WdsSink)
    preprocess: Preprocess | None = None  # how the images were resized (mean/std None: the model's); None: not resized
    dtype: str = "uint8"  # of the stored values: uint8, float16 (mix) or int16/int32 (lift: the key's bound decides)
    listing: str | None = None  # SHA-256 of the source's image paths in order: a rerun continues only the same list

    def shared(self) -> dict:
        """What a client sends a server and the server records: all but ``listing``, a fact of the client's source
        (a server of the previous release refused it as unknown; rows it recorded have none)."""
        doc = asdict(self)
        del doc["listing"]
        return doc

    def validate(self, where: str = "") -> None:
        """ValueError for a field of the wrong type (:func:`ppvit._schema.check_fields`) or range: what is checked of
        a manifest read from a file (edited by hand: a traceback further on, or a size no image could be resized
        to) or sent by a client (``where`` prefixes the message)."""
        from ppvit._schema import check_fields
        from ppvit.crypto.keys import MAX_INPUT_SIZE  # here: the CLI's parser imports this module for its names

        check_fields(self, where)
        if self.block_size < 1 or (self.shard_size is not None and self.shard_size < 1):
            raise ValueError(f"{where}block_size and shard_size are at least 1")
        if self.size is not None and not 1 <= self.size <= MAX_INPUT_SIZE:
            raise ValueError(f"{where}size {self.size}: from 1 to {MAX_INPUT_SIZE}")

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):  # read from JSON
            self.preprocess = Preprocess.of(self.preprocess, "manifest")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is none of {', '.join(DTYPES)}")
        if self.dtype != "uint8" and self.format != "npz":
            raise ValueError(
                f"scheme {self.scheme}: {self.dtype} ciphertext; {self.format} holds uint8 (8-bit PNG images): "
                "use --format npz"
            )

    def check(
        self,
        scheme: str | None = None,
        block_size: int | None = None,
        size: int | None = None,
        fingerprint: str | None = None,
        where: str = "",
    ) -> None:
        """Raise ValueError naming the first setting that differs from this dataset's."""
        from ppvit.crypto.ciphers import Scheme

        wanted = {
            # "plain": decrypted output, checked when an interrupted decrypt is run again
            "scheme": scheme if scheme in (None, PLAIN) else str(Scheme.parse(scheme)),
            "block size": block_size,
            "image size": size,
            "key fingerprint": fingerprint,
        }
        have = {
            "scheme": self.scheme,
            "block size": self.block_size,
            "image size": self.size,
            "key fingerprint": self.key_fingerprint,
        }
        for name, value in wanted.items():
            if value is not None and have[name] is not None and value != have[name]:
                raise ValueError(f"{where or 'encrypted dataset'}: {name} is {have[name]}, not {value}")


def marker_text(manifest: Manifest) -> str:
    """The :data:`MARKER` text of ciphertext written under ``manifest``: JSON, the fingerprint, never the key."""
    m = manifest
    doc = {"key_fingerprint": m.key_fingerprint, "scheme": m.scheme, "block_size": m.block_size, "size": m.size}
    return json.dumps(doc)


def marker_agrees(stated: str | None, expected: str) -> bool:
    """Whether a file's :data:`MARKER` text (None: it has none, as npz shards) states the facts of ``expected``
    (a :func:`marker_text`): a manifest edited by hand, or a file of another dataset, does not."""
    if stated is None:
        return True
    try:
        have, want = json.loads(stated), json.loads(expected)
        # a fact unset on either side agrees, as in Manifest.check: an earlier release continued a run with --size
        # without it, writing the manifest's size as null
        return have.keys() == want.keys() and all(None in (have[k], want[k]) or have[k] == want[k] for k in want)
    except (ValueError, AttributeError):
        return False


def read_marker(text: str, where: str) -> Manifest:
    """The facts a :data:`MARKER` chunk states, as a manifest of one file (``where`` names it in errors)."""
    try:
        doc = json.loads(text)
        return Manifest(doc["scheme"], doc["block_size"], doc["size"], doc["key_fingerprint"], "png")
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{where}: its {MARKER} text chunk is damaged") from None


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    try:
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        doc["format"] = OLD_FORMATS.get(doc.get("format"), doc.get("format"))
        manifest = Manifest(**doc)
        manifest.validate()
        return manifest
    except FileNotFoundError:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such folder") from None
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME} (not written by `ppvit encrypt`?)") from None
    except (OSError, ValueError, TypeError) as exc:  # ValueError: JSON, or a malformed preprocess
        raise ValueError(f"manifest {path}: damaged ({exc})") from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_json(folder / MANIFEST_NAME, asdict(manifest))
