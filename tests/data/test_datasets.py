"""In-memory datasets: the stratified validation split and the disjoint parts."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY
from data_arrays import dataset
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.datasets import (
    ArrayDataset,
    find_test_split,
    load_source_split,
    load_splits,
    load_test_split,
    split_train_val,
    stratified_subset,
    take_part,
)
from ppvit.data.datasets import test_images as audit_images
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.images import resize_array
from ppvit.data.sources import SplitNames, open_source


def test_val_split_is_stratified_disjoint_and_seeded() -> None:
    ds = dataset(400, classes=4)
    train, val = split_train_val(ds, 0.25, seed=1)
    assert len(val) == 100 and np.bincount(val.labels).tolist() == [25] * 4
    t_keys = {im.tobytes() for im in train.images}
    assert not t_keys & {im.tobytes() for im in val.images}
    assert len(t_keys) + len(val) == 400
    _, val2 = split_train_val(ds, 0.25, seed=1)
    np.testing.assert_array_equal(val.images, val2.images)


def test_parts_are_disjoint_and_cover_the_set() -> None:
    ds = dataset(300, classes=3)
    a, b = take_part(ds, "0/2"), take_part(ds, "1/2")
    ka, kb = {im.tobytes() for im in a.images}, {im.tobytes() for im in b.images}
    assert not ka & kb and len(ka | kb) == 300
    assert np.bincount(a.labels).tolist() == [50] * 3
    with pytest.raises(ValueError, match="i/k"):
        take_part(ds, "2/2")


def _photos(root: Path, sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """train/ and test/ of one image per size (w x h), classes a and b alternating; relpath -> pixels."""
    rng = np.random.default_rng(1)
    out = {}
    for split in ("train", "test"):
        for i, (w, h) in enumerate(sizes):
            rel = f"{split}/{'ab'[i % 2]}/{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            out[rel] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(out[rel]).save(root / rel)
    return out


def test_plain_images_of_several_sizes_are_resized_at_load_by_the_one_resize(tmp_path: Path, caplog) -> None:
    photos = _photos(tmp_path / "src", [(40, 30), (16, 16), (20, 50), (33, 33)])
    with caplog.at_level(logging.INFO, logger="ppvit.data.datasets"):
        splits = load_splits(tmp_path / "src", 0.5, 0, size=16)
    test = splits.test
    assert test.images.shape == (4, 16, 16, 3)
    for k, rel in enumerate(sorted(r for r in photos if r.startswith("test/"))):  # the source's order
        np.testing.assert_array_equal(test.images[k], resize_array(photos[rel], 16))
    assert sum("resized to 16x16 at load" in r.getMessage() for r in caplog.records) == 2  # one line per split
    again = load_source_split(tmp_path / "src", "test", size=16)  # from the cache now
    np.testing.assert_array_equal(again.images, test.images)
    with pytest.raises(ValueError, match=r"several sizes \(test/a/0.png is 40x30, test/a/2.png is 20x50\)"):
        load_source_split(tmp_path / "src", "test")  # no size to resize to


def test_ciphertext_of_several_sizes_is_refused_not_resized(tmp_path: Path) -> None:
    _photos(tmp_path / "src", [(16, 16), (16, 16)])
    cipher = BlockCipher(KEY, "shuffle", 4)
    encrypt_collection(tmp_path / "src", tmp_path / "enc", cipher, progress=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "enc" / "test" / "b" / "1.png")
    with pytest.raises(ValueError, match="ciphertext is never resized"):
        load_source_split(tmp_path / "enc", "test", size=16)


@pytest.mark.parametrize(
    ("sizes", "n"),
    [([1] * 10, 5), ([1000] * 10, 13), ([3, 3, 3], 4), ([5, 1, 1], 2), ([7, 2, 9, 4], 21)],
    ids=["one-per-class", "cifar-13", "thirds", "skewed", "n-minus-1"],
)
def test_stratified_subset_gives_exactly_n_within_one_of_each_share(sizes: list[int], n: int) -> None:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    ds = ArrayDataset(np.zeros((len(labels), 1, 1, 3), np.uint8), labels, tuple(map(str, range(len(sizes)))))
    got = np.bincount(stratified_subset(ds, n, seed=0).labels, minlength=len(sizes))
    assert got.sum() == n
    share = n / sum(sizes) * np.array(sizes)
    assert np.all(np.abs(got - share) < 1) and np.all(got <= sizes)


def test_stratified_subset_keeps_its_old_choice_where_rounding_gave_n() -> None:
    ds = dataset(n=200, classes=4)
    rng = np.random.default_rng(3)  # the choice before the remainder was filled: round(share) per class
    old = np.sort(np.concatenate([rng.permutation(np.flatnonzero(ds.labels == c))[:15] for c in range(4)]))
    np.testing.assert_array_equal(stratified_subset(ds, 60, seed=3).images, ds.images[old])


def test_audit_images_come_from_test_else_the_whole_source_exactly_n_resized(tmp_path: Path) -> None:
    _photos(tmp_path / "split", [(16, 16), (16, 16)])
    for rel in ("train/a/0.png", "train/b/1.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "split" / rel)  # black: never chosen
    got = audit_images(tmp_path / "split", 2, 8)
    assert got.shape == (2, 16, 16, 3) and all(im.any() for im in got)  # one size: kept as it is
    flat = tmp_path / "photos"  # one photo per class, mixed sizes, no splits
    for i, (w, h) in enumerate([(40, 30), (16, 16), (20, 50), (33, 33), (9, 12)]):
        (flat / f"c{i}").mkdir(parents=True)
        Image.fromarray(np.full((h, w, 3), 10 * i + 5, np.uint8)).save(flat / f"c{i}" / "x.jpg", quality=100)
    got = audit_images(flat, 3, 8)
    assert got.shape == (3, 8, 8, 3)
    assert len({int(np.median(im)) for im in got}) == 3  # three different photos
    with pytest.raises(ValueError, match="5 images, 6 needed"):
        audit_images(flat, 6, 8)


@pytest.mark.parametrize(
    ("names", "splits"),
    [(("train", "validation"), None), (("training", "holdout"), SplitNames("training", "holdout"))],
    ids=["validation", "--splits"],
)
def test_audit_images_come_from_the_test_split_training_would_use(
    tmp_path: Path, names: tuple[str, str], splits: SplitNames | None
) -> None:
    """One rule for the test split (issue 31): the audit used to look for test/ alone and ignore --splits,
    so it drew from every split, training images included."""
    for split, value in zip(names, (0, 200), strict=True):  # train images black, test images bright
        for c in "ab":
            for i in range(3):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    got = audit_images(tmp_path, 6, 8, splits)
    assert sorted(int(im[0, 0, 0]) for im in got) == [200, 200, 201, 201, 202, 202]
    assert find_test_split(open_source(tmp_path, splits=splits)) == ("test" if splits else "validation")


def test_decoding_a_split_shows_a_bar_with_its_total_unless_quiet(tmp_path: Path, capsys, caplog) -> None:
    _photos(tmp_path / "src", [(16, 16)] * 3)
    with tarfile.open(tmp_path / "src.tar", "w") as tar:  # the total from the tar headers alone
        tar.add(tmp_path / "src", arcname=".")
    for src in (tmp_path / "src", tmp_path / "src.tar"):
        with caplog.at_level(logging.INFO, logger="ppvit.data.datasets"):
            load_source_split(src, "test")
        err = capsys.readouterr().err
        assert "decoding test (once: cached): 100%" in err and "| 3/3 [" in err, err
        with caplog.at_level(logging.WARNING, logger="ppvit.data.datasets"):  # -q
            load_source_split(src, "train")
        assert "decoding" not in capsys.readouterr().err


def _classes(root: Path, per_class: int) -> None:
    """class folders c0..c2 of ``per_class`` 8x8 images, image i of class c filled with 10 c + i."""
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 10 * c + i, np.uint8)).save(root / f"c{c}" / f"{i}.png")


def test_a_folder_of_class_folders_is_one_split_that_holds_out_a_fixed_test_part(tmp_path: Path, caplog) -> None:
    _classes(tmp_path / "flat", 5)
    with caplog.at_level(logging.INFO, logger="ppvit.data.datasets"):
        splits = load_splits(tmp_path / "flat", 0.25, 0)
    assert "one split of 15 images in 3 classes, 20% of each class held out" in caplog.text
    assert len(splits.test) == 3 and sorted(splits.test.labels) == [0, 1, 2]  # one of 5 per class
    assert len(splits.train) + len(splits.val) == 12
    test, _ = load_test_split(tmp_path / "flat")  # eval holds out the same images
    np.testing.assert_array_equal(test.images, splits.test.images)
    seen = {int(im[0, 0, 0]) for ds in (splits.train, splits.val, splits.test) for im in ds.images}
    assert seen == {10 * c + i for c in range(3) for i in range(5)}  # disjoint parts that cover the source


def test_a_validation_split_stands_in_for_a_missing_test_split(tmp_path: Path, caplog) -> None:
    _classes(tmp_path / "d" / "train", 4)
    _classes(tmp_path / "d" / "validation", 2)
    with caplog.at_level(logging.INFO, logger="ppvit.data.datasets"):
        test, _ = load_test_split(tmp_path / "d")
    assert len(test) == 6 and "validation/ is the test split" in caplog.text
    _classes(tmp_path / "only" / "test", 2)
    with pytest.raises(ValueError, match="a test/ split but no train/ split"):
        load_splits(tmp_path / "only", 0.25, 0)
