"""``--splits``: a source whose splits ppvit cannot name by itself, read with the mapping, through the same checks
for every kind (folder, Hugging Face DatasetDict, WebDataset shards); without it each reads other images."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import KEY, SMALL
from PIL import Image

import ppvit.cli.commands as cli
from ppvit.cli.commands import build_parser
from ppvit.cli.train import _train_config
from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.datasets import load_splits
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.sources import SplitNames

CLASSES = ("cat", "dog")
PER_CLASS = 2  # images per class and split: 8x8, one grey level each, so a set of levels names the images


def level(split: int, cls: int, i: int) -> int:
    return 5 + 40 * split + 10 * cls + i


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(out, "PNG")
    return out.getvalue()


def split_images(splits: tuple[str, ...]) -> dict[str, dict[str, list[int]]]:
    """split -> class -> the grey levels of its images (unique over the whole source)."""
    return {
        name: {c: [level(s, k, i) for i in range(PER_CLASS)] for k, c in enumerate(CLASSES)}
        for s, name in enumerate(splits)
    }


# -- one maker per kind: the splits' images in that kind, at the path returned ------------------


def folder(tmp: Path, splits: tuple[str, ...]) -> Path:
    for split, classes in split_images(splits).items():
        for c, levels in classes.items():
            (tmp / "src" / split / c).mkdir(parents=True)
            for v in levels:
                (tmp / "src" / split / c / f"{v}.png").write_bytes(png(v))
    return tmp / "src"


def hf_dict(tmp: Path, splits: tuple[str, ...]) -> Path:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    tables = {}
    for split, classes in split_images(splits).items():
        rows = [(v, k) for k, c in enumerate(CLASSES) for v in classes[c]]
        cells = [{"bytes": png(v), "path": None} for v, _ in rows]
        tables[split] = datasets.Dataset.from_dict({"image": cells, "label": [k for _, k in rows]}, features)
    datasets.DatasetDict(tables).save_to_disk(str(tmp / "src"))
    return tmp / "src"


def wds_shards(tmp: Path, splits: tuple[str, ...]) -> Path:
    pytest.importorskip("webdataset")
    (tmp / "src").mkdir()
    for split, classes in split_images(splits).items():
        with tarfile.open(tmp / "src" / f"{split}-000.tar", "w") as tf:
            for c, levels in classes.items():
                for v in levels:
                    for name, data in ((f"{v:06d}.png", png(v)), (f"{v:06d}.cls", c.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
    return tmp / "src"


# (maker, the source's splits, --splits, the source's train split, its test split)
CASES = [
    (folder, ("holdout", "training"), "train=training,test=holdout", "training", "holdout"),
    (hf_dict, ("test", "train", "validation"), "test=validation", "train", "validation"),
    (wds_shards, ("holdout", "training"), "train=training,test=holdout", "training", "holdout"),
]
IDS = [c[0].__name__ for c in CASES]
Maker = Callable[[Path, tuple[str, ...]], Path]


def levels_of(images: np.ndarray) -> list[int]:
    return sorted(int(im[0, 0, 0]) for im in images)


def expected(splits: tuple[str, ...], split: str) -> list[int]:
    return sorted(v for levels in split_images(splits)[split].values() for v in levels)


@pytest.mark.parametrize(("make", "have", "text", "train", "test"), CASES, ids=IDS)
def test_training_data_are_the_named_splits(
    tmp_path: Path, make: Maker, have: tuple[str, ...], text: str, train: str, test: str
) -> None:
    src = make(tmp_path, have)
    got = load_splits(src, 0.5, 0, splits=SplitNames.parse(text))
    assert levels_of(np.concatenate([got.train.images, got.val.images])) == expected(have, train)
    assert levels_of(got.test.images) == expected(have, test)
    assert got.test.classes == CLASSES
    without = load_splits(src, 0.5, 0)  # another test split: the source's test/, or a share held out
    assert levels_of(without.test.images) != expected(have, test)


@pytest.mark.parametrize(("make", "have", "text", "train", "test"), CASES, ids=IDS)
def test_encrypting_writes_the_named_splits_as_train_and_test(
    tmp_path: Path, make: Maker, have: tuple[str, ...], text: str, train: str, test: str
) -> None:
    src = make(tmp_path, have)
    cipher = BlockCipher(KEY, "shuffle", 4)
    summary = encrypt_collection(src, tmp_path / "enc", cipher, progress=False, splits=SplitNames.parse(text))
    assert summary.written == 2 * len(CLASSES) * PER_CLASS and not summary.failed
    written = {p.relative_to(tmp_path / "enc").parts[:2] for p in (tmp_path / "enc").rglob("*.png")}
    assert written == {(s, c) for s in ("train", "test") for c in CLASSES}
    assert load_splits(tmp_path / "enc", 0.5, 0).test.images.shape[0] == len(CLASSES) * PER_CLASS
    with pytest.raises(ValueError, match="--splits is for the source it was encrypted from"):
        load_splits(tmp_path / "enc", 0.5, 0, splits=SplitNames.parse(text))  # its splits are ppvit's own now
    encrypt_collection(src, tmp_path / "plain-enc", cipher, progress=False)
    assert {p.name for p in (tmp_path / "plain-enc").iterdir() if p.is_dir()} != {"train", "test"}


def test_train_records_the_splits_resume_reuses_them_and_eval_takes_them(tmp_path: Path, capsys) -> None:
    src = folder(tmp_path, ("holdout", "training"))
    run, splits = tmp_path / "run", ["--splits", "train=training,test=holdout"]
    flags = ["--data", str(src), "--out", str(run), "--model", SMALL, "--scheme", "none", "--epochs", "1"]
    flags += ["--batch-size", "2", "--val-fraction", "0.5", "--precision", "no"]
    assert cli.main(["-q", "train", *flags, *splits]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["splits"]
    assert saved == {"train": "training", "test": "holdout"}
    resumed = _train_config(build_parser().parse_args(["train", "--resume", "--out", str(run)]))
    assert resumed.data.splits == SplitNames("training", "holdout")
    capsys.readouterr()
    assert cli.main(["-q", "eval", str(run), "--data", str(src), *splits]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(CLASSES) * PER_CLASS  # holdout/: the test split
    assert cli.main(["-q", "eval", str(run), "--data", str(src), "--splits", "test=heldout"]) == 2
    assert "no split 'heldout' (--splits test=heldout); its splits: holdout, training" in capsys.readouterr().err


def verb_args(tmp: Path, verb: str) -> list[str]:
    src = folder(tmp, ("holdout", "training"))
    key = tmp / "k.key"
    KEY.save(key)
    return {
        "encrypt": ["encrypt", str(src), str(tmp / "enc"), "--key", str(key)],
        "train": ["train", "--data", str(src), "--out", str(tmp / "run"), "--model", SMALL, "--scheme", "none"],
        "eval": ["eval", str(tmp / "no-run"), "--data", str(src)],
        "reproduce": ["reproduce", "--data", str(src), "--out", str(tmp / "rep")],
    }[verb]


@pytest.mark.parametrize(
    ("verbs", "value", "message"),
    [
        (("encrypt", "train", "eval", "reproduce"), "valid=holdout", "'valid' is not a ppvit split"),
        (("encrypt", "train", "eval", "reproduce"), "train=holdout,test=holdout", "train and test name the same"),
        (
            ("encrypt", "train", "reproduce"),
            "train=training,test=heldout",
            "no split 'heldout' (--splits test=heldout); its splits: holdout, training",
        ),
    ],
    ids=["unknown ppvit split", "one split twice", "no such source split"],
)
def test_a_bad_mapping_is_one_line_before_any_work(
    tmp_path: Path, capsys, verbs: tuple[str, ...], value: str, message: str
) -> None:
    for verb in verbs:
        args = verb_args(tmp_path / verb, verb)
        capsys.readouterr()
        assert cli.main(["-q", *args, "--splits", value]) == 2, verb
        err = capsys.readouterr().err
        assert err.startswith(f"ppvit {verb}: error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / verb / "enc").exists() and not (tmp_path / verb / "rep").exists()
