"""WebDataset shards as a source, and the one WebDataset reader: bad samples, damaged shards, duplicated keys."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, train_config
from round_trip import check_round_trip, png, toy_rows, write_shard

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import load_source_split, load_test_split
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.manifest import read_manifest
from ppvit.data.sources import open_source
from ppvit.train.loop import train

pytest.importorskip("webdataset")


def wds_from_toy(toy: Path, out: Path, per_shard: int = 40) -> None:
    """train-000.tar ... and test-000.tar ...: NNNNNN.png + NNNNNN.cls, classes as integers."""
    for split in ("train", "test"):
        pngs, labels = toy_rows(toy, split)
        samples = [
            (f"{i:06d}", {"png": b, "cls": str(y).encode()}) for i, (b, y) in enumerate(zip(pngs, labels, strict=True))
        ]
        for s in range(0, len(samples), per_shard):
            write_shard(out / f"{split}-{s // per_shard:03d}.tar", samples[s : s + per_shard])


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
            ("f", {"png": image, "jpg": image, "cls": b"0"}),  # two images: the .jpg was dropped without a word
            ("g", {"png": image, "cls": b"9" * 5000}),  # past int()'s digit limit: a line naming no shard
        ],
    )
    summary = encrypt_collection(tmp_path / "s", tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
    assert summary.written == 2 and len(summary.failed) == 4
    why = dict(summary.failed)
    assert "sample g of " in why["train/_unlabelled_/train-000_g.png"]
    assert (
        "sample f of " in why["train/0000/train-000_f.png"]
        and "2 images (.png, .jpg)" in why["train/0000/train-000_f.png"]
    )
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


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("a.png", b"1"), ("a.cls", b"0"), ("a.png", b"2")], "a.png appears twice"),  # one sample, twice
        ([("a.png", b"1"), ("b.png", b"2"), ("a.cls", b"0")], "sample a appears twice"),  # members apart
    ],
)
def test_a_duplicated_key_stops_the_read_naming_the_shard(tmp_path: Path, members: list, message: str) -> None:
    with tarfile.open(tmp_path / "train-000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=f"shard {tmp_path / 'train-000.tar'}: {message}"):
        list(open_source(tmp_path / "train-000.tar").items())


def test_encrypted_shards_with_a_sample_missing_its_label_are_refused(tmp_path: Path, toy_dataset: Path) -> None:
    """Our own output always pairs .png and .cls: a lone .png is damage, named, in memory and streamed alike."""

    enc = tmp_path / "enc"
    encrypt_collection(toy_dataset, enc, BlockCipher(KEY, "shuffle", 4), fmt="wds", progress=False)
    shard = enc / "test" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name != "class0/0.cls"]
    with tarfile.open(shard, "w") as tar:
        for member, data in kept:
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"shard-000000.tar: sample class0/0 has no \.cls"):
        load_source_split(enc, "test")
    stream, _ = load_test_split(enc)
    with pytest.raises(ValueError, match=r"sample class0/0 has no \.cls"):
        list(stream.batches(8, 0, 1))


def test_without_webdataset_reading_shards_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    write_shard(tmp_path / "train-000.tar", [("a", {"png": png(np.zeros((4, 4, 3), np.uint8)), "cls": b"0"})])
    source = open_source(tmp_path / "train-000.tar")  # choosing the kind needs no webdataset
    monkeypatch.setitem(sys.modules, "webdataset.tariterators", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs webdataset \(not installed\): pip install 'ppvit\[data\]'"):
        list(source.items())


def test_wds_sink_deals_each_block_of_images_round_robin_over_its_shards(tmp_path: Path, monkeypatch) -> None:
    from ppvit.data.sinks import WdsSink

    monkeypatch.setattr(WdsSink, "SPREAD", 2)  # blocks of 2 shards x 3 images
    sink = WdsSink(tmp_path, 3, ["a"], {"train": 10})
    got = [sink.number("train", i) for i in range(10)]
    # block 0: images 0-5 over shards 0, 1; block 1: images 6-9 (4 left: 2 shards) over shards 2, 3
    assert got == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3]
    assert sink.left == {("train", 0): 3, ("train", 1): 3, ("train", 2): 2, ("train", 3): 2}


def test_classes_file_names_the_cls_numbers(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> None:
    wds_from_toy(toy_dataset, tmp_path / "shards")
    names = tmp_path / "classes.txt"
    names.write_text("red\ngreen\n\nblue\nyellow\n")
    base = ["-q", "encrypt", str(tmp_path / "shards"), "--key", str(key_file), "--block-size", "4"]
    assert cli.main([*base[:3], str(tmp_path / "enc"), *base[3:], "--classes", str(names)]) == 0
    assert read_manifest(tmp_path / "enc").classes["train"] == ["blue", "green", "red", "yellow"]
    assert {p.parent.name for p in (tmp_path / "enc" / "test").rglob("*.png")} == {"blue", "green", "red", "yellow"}
    names.write_text("red\nred\n")
    capsys.readouterr()
    assert cli.main([*base[:3], str(tmp_path / "x"), *base[3:], "--classes", str(names)]) == 2
    assert "classes.txt: a class is named twice" in capsys.readouterr().err
