"""Hugging Face datasets and WebDataset shards as sources: encrypt -> train -> eval, errors, resuming."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, assert_no_key_material, train_config
from PIL import Image

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.manifest import read_manifest
from ppvit.data.sources import Columns, open_source
from ppvit.train.loop import train

datasets = pytest.importorskip("datasets")
CLASSES = ["class0", "class1", "class2", "class3"]


def toy_rows(toy: Path, split: str) -> tuple[list[bytes], list[int]]:
    """The toy dataset's PNG bytes and labels of one split, in file order."""
    files = sorted((toy / split).rglob("*.png"))
    return [f.read_bytes() for f in files], [CLASSES.index(f.parent.name) for f in files]


def hf_split(toy: Path, split: str, image: str = "image", label: str = "label", class_label: bool = True):
    pngs, labels = toy_rows(toy, split)
    features = datasets.Features(
        {image: datasets.Image(), label: datasets.ClassLabel(names=CLASSES) if class_label else datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({image: [{"bytes": b, "path": None} for b in pngs], label: labels}, features)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def wds_from_toy(toy: Path, out: Path, per_shard: int = 40) -> None:
    """train-000.tar ... and test-000.tar ...: NNNNNN.png + NNNNNN.cls, classes as integers."""
    for split in ("train", "test"):
        pngs, labels = toy_rows(toy, split)
        samples = [
            (f"{i:06d}", {"png": b, "cls": str(y).encode()}) for i, (b, y) in enumerate(zip(pngs, labels, strict=True))
        ]
        for s in range(0, len(samples), per_shard):
            write_shard(out / f"{split}-{s // per_shard:03d}.tar", samples[s : s + per_shard])


def check_round_trip(tmp_path: Path, src: str, key_file: Path, flags: tuple[str, ...] = ()) -> dict:
    """encrypt SRC -> train on the ciphertext -> eval; returns the eval result."""
    enc = tmp_path / "enc"
    assert cli.main(["-q", "encrypt", src, str(enc), "--key", str(key_file), "--block-size", "4", *flags]) == 0
    manifest = read_manifest(enc)
    assert manifest.counts == {"test": 32, "train": 96} and manifest.complete
    result = train(train_config(tmp_path / "run", enc, None))
    assert result.test_acc > 0.5 and result.test_images == 32
    evaluated = eval_run(tmp_path / "run", enc)
    assert evaluated["acc"] == pytest.approx(result.test_acc)
    assert_no_key_material([enc, tmp_path / "run"], Key.load(key_file))
    return evaluated


def eval_run(run: Path, data: Path | str, *flags: str) -> dict:
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["eval", str(run), "--data", str(data), *flags]) == 0
    return json.loads(out.getvalue())


def test_hf_save_to_disk_round_trip(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    hf = tmp_path / "hf"
    datasets.DatasetDict(train=hf_split(toy_dataset, "train"), test=hf_split(toy_dataset, "test")).save_to_disk(hf)
    assert open_source(hf).kind == "hf"
    rels = list(open_source(hf).paths())
    assert rels[0] == "test/class0/00000000.png" and len(rels) == 128
    check_round_trip(tmp_path, str(hf), key_file)
    assert sorted(read_manifest(tmp_path / "enc").classes["train"]) == CLASSES
    # plain training straight from the dataset (encrypted in the pipeline), then eval on it
    result = train(train_config(tmp_path / "run-plain", hf, key_file))
    assert result.test_acc > 0.5
    assert eval_run(tmp_path / "run-plain", hf, "--key", str(key_file))["acc"] == pytest.approx(result.test_acc)


def test_hf_parquet_with_named_columns(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> None:
    """Hub layout (data/train-00000-of-00001.parquet); no ClassLabel, so the label column is named by a flag."""
    for split in ("train", "test"):
        hf_split(toy_dataset, split, "picture", "target", class_label=False).to_parquet(
            tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet"
        )
    pq = str(tmp_path / "pq")
    capsys.readouterr()
    assert cli.main(["-q", "encrypt", pq, str(tmp_path / "x"), "--key", str(key_file)]) == 2
    err = capsys.readouterr().err
    assert "test-00000-of-00001.parquet" in err and "--label-column" in err and len(err.strip().splitlines()) == 1
    check_round_trip(tmp_path, pq, key_file, ("--label-column", "target"))
    assert read_manifest(tmp_path / "enc").classes["train"] == ["0000", "0001", "0002", "0003"]  # sort as numbers
    with pytest.raises(ValueError, match="no column 'nope'"):
        list(open_source(pq, Columns(label="nope")).items())
    # training straight from parquet with the column named in the config
    result = train(train_config(tmp_path / "run-plain", Path(pq), key_file, label_column="target", epochs=1))
    assert result.num_classes == 4


def test_hf_bad_rows_are_counted_not_fatal(tmp_path: Path, toy_dataset: Path) -> None:
    ds = hf_split(toy_dataset, "test")
    rows = ds.to_dict()  # decoded images: rebuild with raw bytes, one of them damaged
    pngs, labels = toy_rows(toy_dataset, "test")
    pngs[3] = b"not an image"
    features = ds.features
    datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}, features
    ).save_to_disk(tmp_path / "hf")
    assert len(rows["label"]) == 32
    summary = encrypt_collection(tmp_path / "hf", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    assert summary.written == 31 and [r for r, _ in summary.failed] == ["class0/00000003.png"]
    assert "cannot decode" in summary.failed[0][1]
    again = encrypt_collection(tmp_path / "hf", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    assert again.skipped == 31 and again.written == 0  # resumable: finished images are skipped


def test_wds_source_round_trip(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    shards = tmp_path / "shards"
    wds_from_toy(toy_dataset, shards)
    assert open_source(shards).kind == "wds" and open_source(shards / "train-000.tar").kind == "wds"
    assert open_source(f"{shards}/{{train,test}}-{{000..002}}.tar").kind == "wds"
    rels = list(open_source(f"{shards}/train-{{000..002}}.tar").paths())
    assert len(rels) == 96 and rels[0] == "train/0000/train-000_000000.png"
    check_round_trip(tmp_path, str(shards), key_file)
    result = train(train_config(tmp_path / "run-plain", shards, key_file, epochs=1))
    assert result.num_classes == 4


def test_wds_source_bad_samples_and_damaged_shards(tmp_path: Path, capsys) -> None:
    image = png(np.full((8, 8, 3), 100, np.uint8))
    write_shard(
        tmp_path / "s" / "train-000.tar",
        [
            ("a", {"png": image, "cls": b"1"}),
            ("b", {"jpg": b"garbage", "cls": b"0"}),  # does not decode
            ("c", {"png": image}),  # no label
            ("d", {"json": b"{}"}),  # no image: not an image at all
            ("e", {"png": image, "cls": b"0"}),
        ],
    )
    summary = encrypt_collection(tmp_path / "s", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    assert summary.written == 2 and len(summary.failed) == 2
    why = dict(summary.failed)
    assert "cannot decode" in why["train/0000/train-000_b.jpg"]
    assert (
        "no .cls member" in why["train/_unlabelled_/train-000_c.png"]
        and "train-000.tar" in why["train/_unlabelled_/train-000_c.png"]
    )
    data = (tmp_path / "s" / "train-000.tar").read_bytes()
    (tmp_path / "s" / "train-001.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated
    Key.generate().save(tmp_path / "k.key")
    code = cli.main(["-q", "encrypt", str(tmp_path / "s"), str(tmp_path / "enc2"), "--key", str(tmp_path / "k.key")])
    err = capsys.readouterr().err
    assert code == 2 and "train-001.tar" in err and "damaged" in err and len(err.strip().splitlines()) == 1
    code = cli.main(
        [
            "-q",
            "encrypt",
            f"{tmp_path}/s/train-{{000..005}}.tar",
            str(tmp_path / "e3"),
            "--key",
            str(tmp_path / "k.key"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train-002.tar" in err and "not found" in err


def test_preview_shows_one_image_per_class_first(tmp_path: Path, toy_dataset: Path) -> None:
    from ppvit.experiments.preview import sample_images

    first = [np.asarray(Image.open(sorted((toy_dataset / "train" / c).glob("*.png"))[0])) for c in CLASSES]
    second = [np.asarray(Image.open(sorted((toy_dataset / "train" / c).glob("*.png"))[1])) for c in CLASSES]
    got = sample_images(toy_dataset, 4, None, "train/")
    assert len(got) == 4 and all(np.array_equal(g, f) for g, f in zip(got, first, strict=True))
    got = sample_images(toy_dataset, 6, None, "train/")  # more than the classes: a second round
    assert all(np.array_equal(g, f) for g, f in zip(got, first + second[:2], strict=True))
    hf = tmp_path / "hf"
    datasets.DatasetDict(train=hf_split(toy_dataset, "train"), test=hf_split(toy_dataset, "test")).save_to_disk(hf)
    got = sample_images(hf, 4, None, "train/")  # any source
    assert all(np.array_equal(g, f) for g, f in zip(got, first, strict=True))
