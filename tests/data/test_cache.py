"""The decoded-image cache: private (0700 folders, 0600 files, whatever the umask), and PPVIT_CACHE=off turns it off."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from ppvit.data.datasets import load_source_split


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_decoded_images_are_cached_privately_and_read_back(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPVIT_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)  # a umask that leaves new files readable by everyone
    try:
        first = load_source_split(toy_dataset, "test")
    finally:
        os.umask(old)
    cached = list((tmp_path / "cache").rglob("*.npz"))
    assert len(cached) == 1 and cached[0].parent == tmp_path / "cache" / "decoded"
    assert mode(tmp_path / "cache") == 0o700 and mode(cached[0].parent) == 0o700 and mode(cached[0]) == 0o600
    with np.load(cached[0]) as z:  # the one npz layout: images, labels, classes, paths
        assert sorted(z.files) == ["classes", "images", "labels", "paths"]
        np.testing.assert_array_equal(z["images"], first.images)
    (cached[0].parent).chmod(0o755)  # an older, looser folder is made private again
    again = load_source_split(toy_dataset, "test")
    assert mode(cached[0].parent) == 0o700
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.classes == first.classes


def test_cache_off_writes_nothing(tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPVIT_CACHE", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where the default cache folder would be
    ds = load_source_split(toy_dataset, "test")
    assert len(ds) == 32
    assert not list(tmp_path.rglob("*.npz")) and not (Path("off")).exists()


def test_an_image_added_or_replaced_in_a_class_folder_is_not_served_from_the_cache(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache key held the top folder's own time, which an image added to ``test/class0/`` leaves as it was:
    the rerun trained on the images from before, the new one left out without a word."""
    import shutil

    from PIL import Image

    monkeypatch.setenv("PPVIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shutil.copytree(toy_dataset, src)
    before = load_source_split(src, "test")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(src / "test" / "class0" / "zz-added.png")
    added = load_source_split(src, "test")
    assert len(added) == len(before) + 1 and (added.images == 255).all(axis=(1, 2, 3)).sum() == 1
    first = sorted((src / "test" / "class1").iterdir())[0]
    Image.new("RGB", (32, 32), (0, 0, 0)).save(first)  # replaced under its own name, same size on disk or not
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    replaced = load_source_split(src, "test")
    assert (replaced.images == 0).all(axis=(1, 2, 3)).sum() == (added.images == 0).all(axis=(1, 2, 3)).sum() + 1
