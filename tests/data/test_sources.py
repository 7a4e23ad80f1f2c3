"""Every source kind through the same checks: the same content gives the same images, labels and classes."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.datasets import load_source_split
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.manifest import MANIFEST_NAME
from ppvit.data.sources import KINDS, open_source
from ppvit.data.sources import cifar10 as cifar10_kind
from ppvit.data.sources.base import EncryptedFolder

CLASSES = ["class0", "class1", "class2", "class3"]
CIPHER = BlockCipher(KEY, "shuffle", 4)


def toy_split(toy: Path, split: str) -> tuple[list[Path], list[int]]:
    files = sorted((toy / split).rglob("*.png"))
    return files, [CLASSES.index(f.parent.name) for f in files]


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# -- one maker per kind: the toy dataset (train 96, test 32 images, 4 classes) in that kind ----------


def folder(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return str(toy)


def archive(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    members = {p.relative_to(toy).as_posix(): p.read_bytes() for p in sorted(toy.rglob("*.png"))}
    return str(write_tar(tmp / "toy.tar", members))


def hf_disk(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for split in ("train", "test"):
        files, labels = toy_split(toy, split)
        cells = [{"bytes": f.read_bytes(), "path": None} for f in files]
        splits[split] = datasets.Dataset.from_dict({"image": cells, "label": labels}, features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp / "hf"))
    return str(tmp / "hf")


def hf_parquet(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for split in ("train", "test"):
        files, labels = toy_split(toy, split)
        cells = [{"bytes": f.read_bytes(), "path": None} for f in files]
        table = datasets.Dataset.from_dict({"image": cells, "label": labels}, features)
        table.to_parquet(tmp / "pq" / "data" / f"{split}-00000-of-00001.parquet")
    return str(tmp / "pq")


def wds_shards(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("webdataset")
    (tmp / "shards").mkdir()
    for split in ("train", "test"):
        files, _ = toy_split(toy, split)
        for s in range(0, len(files), 40):  # several shards per split, the class as text in .cls
            members = {}
            for i, f in enumerate(files[s : s + 40]):
                members[f"{s + i:06d}.png"] = f.read_bytes()
                members[f"{s + i:06d}.cls"] = f.parent.name.encode()
            write_tar(tmp / "shards" / f"{split}-{s // 40:03d}.tar", members)
    return str(tmp / "shards")


def cifar10(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    class Download:  # what torchvision's CIFAR10 has: data NHWC, targets, classes
        def __init__(self, train: bool) -> None:
            files, self.targets = toy_split(toy, "train" if train else "test")
            self.data = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
            self.classes = CLASSES

    monkeypatch.setattr(cifar10_kind, "torchvision_split", lambda root, train: Download(train))
    return "cifar10"


def encrypted(fmt: str) -> Callable[[Path, Path, pytest.MonkeyPatch], str]:
    def make(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
        if fmt == "wds":
            pytest.importorskip("webdataset")
        summary = encrypt_collection(toy, tmp / f"enc-{fmt}", CIPHER, fmt=fmt, progress=False)  # type: ignore[arg-type]
        assert summary.written == 128 and not summary.failed
        return str(tmp / f"enc-{fmt}")

    return make


def old_npz(toy: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Shards as ppvit 0.1-0.2 wrote them (a class name per image, no labels) under a manifest naming "npy"."""
    out = tmp / "old"
    for split in ("train", "test"):
        files, _ = toy_split(toy, split)
        rels = [f.relative_to(toy).as_posix() for f in files]
        images = np.stack([CIPHER.encrypt(np.asarray(Image.open(f).convert("RGB"))) for f in files])
        (out / split).mkdir(parents=True)
        np.savez(out / split / "shard-00000.npz", images=images, classes=np.array([f.parent.name for f in files]),
                 paths=np.array(rels))  # fmt: skip
    manifest = {"scheme": "shuffle", "block_size": 4, "size": None, "key_fingerprint": KEY.fingerprint,
                "format": "npy", "classes": {"test": CLASSES, "train": CLASSES}}  # fmt: skip
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(out)


KIND_CASES = [
    ("files", folder, False),
    ("files", archive, False),
    ("hf", hf_disk, False),
    ("hf", hf_parquet, False),
    ("wds", wds_shards, False),
    ("cifar10", cifar10, False),
    ("encrypted-png", encrypted("png"), True),
    ("encrypted-npz", encrypted("npz"), True),
    ("encrypted-wds", encrypted("wds"), True),
    ("encrypted-npz", old_npz, True),
]


def expected(toy: Path, split: str, encrypt: bool) -> list[tuple[int, bytes]]:
    """(label, pixels) of every image of the split, sorted: the content, whatever order a kind reads it in."""
    files, labels = toy_split(toy, split)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return sorted((y, (CIPHER.encrypt(im) if encrypt else im).tobytes()) for y, im in zip(labels, images, strict=True))


@pytest.mark.parametrize(("kind", "make", "is_encrypted"), KIND_CASES, ids=[c[1].__name__ for c in KIND_CASES])
def test_every_kind_reads_the_same_content(
    kind: str, make: Callable, is_encrypted: bool, toy_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make(toy_dataset, tmp_path, monkeypatch)
    source = open_source(src)
    assert (source.kind, source.encrypted) == (kind, is_encrypted)
    assert source.splits_and_classes() == (["test", "train"], CLASSES)
    for split in ("train", "test"):
        ds = load_source_split(src, split)
        assert ds.classes == tuple(CLASSES) and ds.images.shape == (len(ds), 32, 32, 3)
        got = sorted((int(y), im.tobytes()) for y, im in zip(ds.labels, ds.images, strict=True))
        assert got == expected(toy_dataset, split, is_encrypted), f"{kind} {split}"
    rels = list(source.paths())
    assert len(rels) == 128 and {r.split("/")[0] for r in rels} == {"train", "test"}
    if is_encrypted:  # the three encrypted kinds: one base reads the manifest, claims and names the files
        assert isinstance(source, EncryptedFolder) and source.manifest is not None
        assert source.files() == [Path(src) / MANIFEST_NAME]
        assert not {"__init__", "claims", "files"} & set(vars(type(source)))


def test_the_registry_has_one_entry_per_kind_and_files_last() -> None:
    kinds = [k.kind for k in KINDS]
    assert len(set(kinds)) == len(kinds) and kinds[-1] == "files"
    assert {c[0] for c in KIND_CASES} == set(kinds)  # the table above covers every kind


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/nonexistent/data", FileNotFoundError, "source /nonexistent/data: not found"),
        ("notes.txt", ValueError, "notes.txt: not an image, a folder of images, a tar archive"),
    ],
)
def test_nothing_readable_is_one_line(tmp_path: Path, path: str, error: type, message: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    target = path if path.startswith("/") else str(tmp_path / path)
    with pytest.raises(error, match=message):
        open_source(target)


def test_importing_the_registry_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, ppvit.data.sources; print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
