"""``ppvit decrypt`` of a dataset someone else wrote or edited: a manifest changed by hand, ciphertext of the wrong
size, damaged npz shards. Each was a traceback or, worse, every image "decrypted" into noise with exit 0."""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, run_cli
from PIL import Image
from test_cli_encrypt import make_tree, read_png, tree_digest

from ppvit.data.manifest import MANIFEST_NAME


def encrypted(tmp_path: Path, key_file: Path, capsys, fmt: str = "png") -> Path:
    make_tree(tmp_path / "src", n=2, size=16)
    argv = ["encrypt", tmp_path / "src", tmp_path / "enc", "--key", key_file, "--block-size", "4", "--format", fmt]
    assert run_cli([*argv, "--size", "16"], capsys)[0] == 0
    return tmp_path / "enc"


def edit_manifest(folder: Path, change) -> None:
    doc = json.loads((folder / MANIFEST_NAME).read_text())
    doc = change(doc) or doc
    (folder / MANIFEST_NAME).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.update(block_size="4"), "damaged (block_size '4': must be an integer)"),  # a TypeError's traceback
        (lambda d: d.update(size=-16), "damaged (size -16: from 1 to 4096)"),  # a RuntimeError's
        (lambda d: d.update(size=10**6), "damaged (size 1000000: from 1 to 4096)"),  # was "--size", not a decrypt flag
        (lambda d: [1, 2], "damaged (not a JSON object)"),  # an AttributeError's
        (lambda d: d.update(format="zip"), "format 'zip': must be one of png, npz, wds"),
        # consistent, but not what the files say: every image was decrypted into noise, exit 0
        (lambda d: d.update(size=32), 'its image test/cat/0.png, {"key_fingerprint"'),
        (lambda d: d.update(block_size=8), '"block_size": 8'),
        (lambda d: d.update(scheme="shuffle+scramble"), '"scheme": "shuffle+scramble"'),
    ],
    ids=["block str", "size negative", "size huge", "a list", "format", "size", "block size", "scheme"],
)
def test_a_manifest_edited_by_hand_is_one_line_and_nothing_decrypted(
    tmp_path: Path, key_file: Path, capsys, change, says: str
) -> None:
    enc = encrypted(tmp_path, key_file, capsys)
    edit_manifest(enc, change)
    one_line_error(["decrypt", enc, tmp_path / "dec", "--key", key_file], capsys, says)
    assert not list((tmp_path / "dec").rglob("*.png")) if (tmp_path / "dec").exists() else True


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (os.mkfifo, "not a regular file"),  # waited on forever
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),  # read until memory ran out
        (lambda p: p.write_text("[" * 100_000), "nested too deeply"),  # a RecursionError's traceback
    ],
    ids=["fifo", "dev-zero", "deep"],
)
def test_a_manifest_that_is_no_json_file_is_one_line_naming_it(
    tmp_path: Path, key_file: Path, capsys, make, says: str
) -> None:
    manifest = encrypted(tmp_path, key_file, capsys) / MANIFEST_NAME
    manifest.unlink()
    make(manifest)
    # a reader still waiting on the pipe after a minute is let go (a writer's end, closed): the test then fails
    release = threading.Timer(60, lambda: os.close(os.open(manifest, os.O_WRONLY | os.O_NONBLOCK)))
    release.start()
    try:
        one_line_error(
            ["decrypt", manifest.parent, tmp_path / "dec", "--key", key_file], capsys, f"manifest {manifest}", says
        )
    finally:
        release.cancel()


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_ciphertext_of_another_size_is_named_never_resized(tmp_path: Path, key_file: Path, capsys, fmt: str) -> None:
    """A 24x24 PNG dropped into the folder, or an npz shard of 8x16 images, was resized to the manifest's 16 and
    "decrypted" into noise, exit 0 (the README: ciphertext is never resized)."""
    enc = encrypted(tmp_path, key_file, capsys, fmt)
    if fmt == "png":
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(enc / "train" / "cat" / "odd.png")
        bad = ["train/cat/odd.png"]
    else:
        shard = enc / "train" / "shard-00000.npz"
        arrays = dict(np.load(shard))
        arrays["images"] = arrays["images"][:, :8]
        np.savez(shard, **arrays)
        bad = [str(p) for p in arrays["paths"]]
    code, _, err = run_cli(["decrypt", enc, tmp_path / "dec", "--key", key_file], capsys)
    assert code == 1, err
    for rel in bad:
        side = "24x24" if fmt == "png" else "16x8"  # width x height
        assert f"{rel}: is {side}; the dataset's ciphertext is 16x16" in err, err
        assert not (tmp_path / "dec" / rel).with_suffix(".png").exists()
    assert read_png(tmp_path / "dec" / "test" / "cat" / "0.png").shape == (16, 16, 3)  # the others decrypted


def _edit_arrays(shard: Path, change) -> None:
    arrays = dict(np.load(shard))
    change(arrays)
    np.savez(shard, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("cut in half", "damaged (ValueError: not an npz file (a zip archive), or one cut short)"),
        ("empty", "damaged"),
        ("garbage", "damaged (ValueError: not an npz file"),  # was said to hold pickled (object) data
        ("object arrays", "damaged"),
        ("labels past its classes", "damaged"),
        # each lost images with exit 0 (hostile tester): the shard skipped, or images decrypted over others
        ("no paths", "damaged (ValueError: 4 images of shape (16, 16, 3), 4 labels, 0 paths)"),
        ("a path twice", "train/cat/0.png is listed twice"),
        ("paths of another split", "test/cat/0.png is not of the split 'train' its shard is in"),
        ("a path in two shards", "train/cat/0.png is listed twice"),
        # a traceback each: numpy's MemoryError (4.58 TiB), PIL's TypeError; four channels were decrypted to RGBA
        ("a header declaring terabytes", "damaged (ValueError: images.npy declares (100000, 4096, 4096, 3) of uint8"),
        ("one channel", "damaged (ValueError: 4 images of shape (16, 16, 1)"),
        ("four channels", "damaged (ValueError: 4 images of shape (16, 16, 4)"),
    ],
)
def test_a_damaged_npz_shard_is_one_line_naming_it(
    tmp_path: Path, key_file: Path, capsys, damage: str, says: str
) -> None:
    enc = encrypted(tmp_path, key_file, capsys, "npz")
    if damage == "paths of another split":
        (enc / "test" / "shard-00000.npz").unlink()  # its paths then are of no other shard
    shard = enc / "train" / "shard-00000.npz"
    data = shard.read_bytes()
    if damage == "cut in half":
        shard.write_bytes(data[: len(data) // 2])
    elif damage in ("empty", "garbage"):
        shard.write_bytes(b"garbage" if damage == "garbage" else b"")
    elif damage == "a header declaring terabytes":
        _edit_arrays(shard, lambda a: a.update(images=None))
        header = np.lib.format.header_data_from_array_1_0(np.zeros((0,), np.uint8)) | {"shape": (10**5, 4096, 4096, 3)}
        npy = io.BytesIO()
        np.lib.format.write_array_header_1_0(npy, header)
        with zipfile.ZipFile(shard, "a") as z:
            z.writestr("images.npy", npy.getvalue() + bytes(64))
    elif damage == "a path in two shards":
        shard = shard.with_name("shard-00001.npz")
        shard.write_bytes(data)
    else:
        change = {
            "object arrays": lambda a: a.update(images=np.array([{}] * len(a["images"]), dtype=object)),
            "labels past its classes": lambda a: a.update(labels=a["labels"] + 7),
            "no paths": lambda a: a.update(paths=None),
            "a path twice": lambda a: a["paths"].__setitem__(1, a["paths"][0]),
            "paths of another split": lambda a: a.update(paths=np.char.replace(a["paths"], "train/", "test/")),
            "one channel": lambda a: a.update(images=a["images"][..., :1]),
            "four channels": lambda a: a.update(images=np.concatenate([a["images"], a["images"][..., :1]], -1)),
        }[damage]
        _edit_arrays(shard, change)
    one_line_error(["decrypt", enc, tmp_path / "dec", "--key", key_file], capsys, f"shard {shard}: {says}")


def test_errors_name_what_the_user_gave(tmp_path: Path, key_file: Path, capsys) -> None:
    """keygen into a missing folder named its hidden temporary file (``.new.key.1a2b3c4d.tmp``); decrypt of a folder
    that does not exist said it had no manifest."""
    err = one_line_error(["keygen", tmp_path / "nowhere" / "new.key"], capsys, f"{tmp_path / 'nowhere' / 'new.key'}'")
    assert ".tmp" not in err
    one_line_error(
        ["decrypt", tmp_path / "nothere", tmp_path / "dec", "--key", key_file], capsys, "nothere: no such folder"
    )


@pytest.mark.parametrize(("first", "rerun"), [(["--size", "32"], []), ([], ["--size", "32"])], ids=["drop", "add"])
def test_a_run_continued_with_another_size_is_refused_and_writes_nothing(
    tmp_path: Path, key_file: Path, capsys, first: list[str], rerun: list[str]
) -> None:
    """A run with ``--size 32`` continued without it (or the reverse) wrote 16x16 and 32x32 ciphertext into one
    dataset and the manifest's size as the rerun's, exit 0 (hostile tester): unset was taken for "any size"."""
    make_tree(tmp_path / "src", n=2, size=16)
    argv = ["encrypt", tmp_path / "src", tmp_path / "enc", "--key", key_file, "--block-size", "4"]
    assert run_cli([*argv, *first], capsys)[0] == 0
    (tmp_path / "enc" / "train" / "cat" / "0.png").unlink()  # the run stopped before its last image
    before = tree_digest(tmp_path / "enc")
    says = "with --size 32, this run is without --size" if first else "without --size, this run is with --size 32"
    one_line_error([*argv, *rerun], capsys, f"output {tmp_path / 'enc'}: was written {says}")
    assert tree_digest(tmp_path / "enc") == before
    assert run_cli([*argv, *first], capsys)[0] == 0  # continued as it was written
    assert read_png(tmp_path / "enc" / "train" / "cat" / "0.png").shape == (32 if first else 16,) * 2 + (3,)


def test_a_dataset_whose_manifest_lost_its_size_decrypts(tmp_path: Path, key_file: Path, capsys) -> None:
    """An earlier release continued a ``--size 16`` run without it, writing the manifest's size as null while the
    first run's PNGs state 16: every decrypt was refused as an edited manifest (second reader). Unset agrees, as in
    ``Manifest.check``."""
    enc = encrypted(tmp_path, key_file, capsys)
    edit_manifest(enc, lambda d: d.update(size=None, preprocess=None))
    assert run_cli(["decrypt", enc, tmp_path / "dec", "--key", key_file], capsys)[0] == 0
    assert read_png(tmp_path / "dec" / "test" / "cat" / "0.png").shape == (16, 16, 3)
