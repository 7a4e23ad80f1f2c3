"""Hugging Face datasets as sources: save_to_disk and parquet, named columns, bad rows; previews of any source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, train_config
from PIL import Image
from round_trip import CLASSES, check_round_trip, eval_run, toy_rows

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.manifest import read_manifest
from ppvit.data.sources import Columns, open_source
from ppvit.train.loop import train

datasets = pytest.importorskip("datasets")


def hf_split(toy: Path, split: str, image: str = "image", label: str = "label", class_label: bool = True):
    pngs, labels = toy_rows(toy, split)
    features = datasets.Features(
        {image: datasets.Image(), label: datasets.ClassLabel(names=CLASSES) if class_label else datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({image: [{"bytes": b, "path": None} for b in pngs], label: labels}, features)


def test_hf_save_to_disk_round_trip(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    hf = tmp_path / "hf"
    datasets.DatasetDict(train=hf_split(toy_dataset, "train"), test=hf_split(toy_dataset, "test")).save_to_disk(str(hf))
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
    ).save_to_disk(str(tmp_path / "hf"))
    assert len(rows["label"]) == 32
    summary = encrypt_collection(tmp_path / "hf", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    assert summary.written == 31 and [r for r, _ in summary.failed] == ["class0/00000003.png"]
    assert "cannot decode" in summary.failed[0][1]
    again = encrypt_collection(tmp_path / "hf", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    assert again.skipped == 31 and again.written == 0  # resumable: finished images are skipped


def test_a_path_cell_is_read_from_under_the_datasets_folder_only(tmp_path: Path, toy_dataset: Path) -> None:
    """A parquet cell holding only a path, absolute or climbing out of the dataset's folder, read a local file
    (``private/secret.png``) and encrypted it into the output, exit 0 (hostile tester); an absolute path inside the
    folder, as ``Dataset.to_parquet`` writes them, is read (second reader: the first fix refused every one)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    png = toy_rows(toy_dataset, "test")[0][0]
    for folder in ("hf/data", "hf/blobs", "private"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "hf" / "blobs" / "a").write_bytes(png)  # no image's name: an image file would make hf/ a folder tree
    (tmp_path / "private" / "secret.png").write_bytes(png)
    paths = ["../blobs/a", str(tmp_path / "private" / "secret.png"), "../../private/secret.png"]
    paths.append(str(tmp_path / "hf" / "blobs" / "a"))
    cells = [{"bytes": None, "path": p} for p in paths]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat"])})
    table = pa.table({"image": cells, "label": [0] * 4}, schema=features.arrow_schema)
    pq.write_table(table, tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    summary = encrypt_collection(tmp_path / "hf", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    failed = dict(summary.failed)
    assert summary.written == 2 and sorted(failed) == ["train/cat/00000001.png", "train/cat/00000002.png"], failed
    assert all("outside the dataset's folder" in why for why in failed.values()), failed


def test_preview_shows_one_image_per_class_first(tmp_path: Path, toy_dataset: Path) -> None:
    from ppvit.experiments.preview import sample_images

    first = [np.asarray(Image.open(sorted((toy_dataset / "train" / c).glob("*.png"))[0])) for c in CLASSES]
    second = [np.asarray(Image.open(sorted((toy_dataset / "train" / c).glob("*.png"))[1])) for c in CLASSES]
    got = sample_images(toy_dataset, 4, None, "train/")
    assert len(got) == 4 and all(np.array_equal(g, f) for g, f in zip(got, first, strict=True))
    got = sample_images(toy_dataset, 6, None, "train/")  # more than the classes: a second round
    assert all(np.array_equal(g, f) for g, f in zip(got, first + second[:2], strict=True))
    hf = tmp_path / "hf"
    datasets.DatasetDict(train=hf_split(toy_dataset, "train"), test=hf_split(toy_dataset, "test")).save_to_disk(str(hf))
    got = sample_images(hf, 4, None, "train/")  # any source
    assert all(np.array_equal(g, f) for g, f in zip(got, first, strict=True))


def test_hf_train_validation_and_a_single_dataset_load(tmp_path: Path, toy_dataset: Path) -> None:
    from ppvit.data.datasets import load_splits

    pair = tmp_path / "pair"
    datasets.DatasetDict(train=hf_split(toy_dataset, "train"), validation=hf_split(toy_dataset, "test")).save_to_disk(
        str(pair)
    )
    splits = load_splits(pair, 0.25, 0)
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (96, 32)  # validation: the test split
    single = tmp_path / "single"
    hf_split(toy_dataset, "train").save_to_disk(str(single))
    splits = load_splits(single, 0.25, 0)
    assert len(splits.test) == 4 * round(24 * 0.2) and splits.train.classes == tuple(
        CLASSES
    )  # 20% of each class held out
