"""Parquet folders as `ppvit encrypt` reads them: by a relative path as by an absolute one, and fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_hf import hf_split

from ppvit import cli
from ppvit.data.sources import open_source

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> Path:
    root = tmp_path_factory.mktemp("hf") / "hf-parquet"
    for split in ("train", "test"):
        hf_split(toy_dataset, split).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_a_relative_path_through_a_parent_finds_the_same_images(
    parquet_folder: Path, tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`ppvit encrypt ../hf-parquet out` found no images (the '..' was taken for a hidden folder)."""
    work = parquet_folder.parent / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    assert sorted(open_source("../hf-parquet").paths()) == sorted(open_source(str(parquet_folder)).paths())
    assert len(list(open_source("../hf-parquet").paths())) == 128
    out = tmp_path / "enc"
    assert cli.main(["-q", "encrypt", "../hf-parquet", str(out), "--key", str(key_file), "--block-size", "4"]) == 0
    assert len([p for p in out.rglob("*.png")]) == 128 and os.getcwd() == str(work)
