"""Shared by the source tests: the toy dataset's rows, shards written by hand, and encrypt -> train -> eval."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_no_key_material, train_config
from PIL import Image

from ppvit import cli
from ppvit.crypto.keys import Key
from ppvit.data.manifest import read_manifest
from ppvit.train.loop import train

CLASSES = ["class0", "class1", "class2", "class3"]


def toy_rows(toy: Path, split: str) -> tuple[list[bytes], list[int]]:
    """The toy dataset's PNG bytes and labels of one split, in file order."""
    files = sorted((toy / split).rglob("*.png"))
    return [f.read_bytes() for f in files], [CLASSES.index(f.parent.name) for f in files]


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
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["eval", str(run), "--data", str(data), *flags]) == 0
    return json.loads(out.getvalue())
