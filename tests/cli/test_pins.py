"""A key's pinned geometry is the default of every verb that encrypts or reads ciphertext, and a one-line
refusal of anything else (issue 29, item 2): encrypt, train, predict, client predict and client train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_tools import pinned_key, toy_run
from conftest import SMALL, one_line_error, run_cli
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Geometry, Key, PinError, settle
from ppvit.data.images import resize_array
from ppvit.data.manifest import read_manifest


def photos(root: Path) -> dict[str, np.ndarray]:
    """A folder of class folders of two sizes (photos are never one size)."""
    rng = np.random.default_rng(0)
    out = {}
    for i, (cls, side) in enumerate([("cat", 20), ("cat", 24), ("dog", 28), ("dog", 20)]):
        arr = rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / cls / f"{i}.png")
        out[f"{cls}/{i}.png"] = arr
    return out


def test_settle_takes_the_pin_when_nothing_is_asked_and_refuses_anything_else() -> None:
    assert settle("block size", None, 16, "key file k.key pins") == 16
    assert settle("block size", 16, 16, "key file k.key pins") == 16
    assert settle("block size", 8, None, "key file k.key pins") == 8
    assert settle("block size", None, None, "key file k.key pins", default=4) == 4
    with pytest.raises(PinError, match=r"^key file k\.key pins block size 16, not 8$"):
        settle("block size", 8, 16, "key file k.key pins")


def test_encrypt_takes_the_pinned_geometry_without_flags(tmp_path: Path, capsys) -> None:
    """The issue: without --size it still asked for one (images of several sizes)."""
    key = pinned_key(tmp_path / "pinned.key", "shuffle+scramble", 4, 16)
    images = photos(tmp_path / "src")
    code, _, err = run_cli(["encrypt", tmp_path / "src", tmp_path / "enc", "--key", key], capsys)
    assert code == 0, err
    m = read_manifest(tmp_path / "enc")
    assert (m.scheme, m.block_size, m.size) == ("shuffle+scramble", 4, 16)
    cipher = BlockCipher(Key.load(key), "shuffle+scramble", 4)
    for rel, arr in images.items():
        got = np.asarray(Image.open(tmp_path / "enc" / rel).convert("RGB"))
        np.testing.assert_array_equal(got, cipher.encrypt(resize_array(arr, 16)))


@pytest.mark.parametrize(
    ("flags", "pinned", "asked"),
    [
        (["--size", "32"], "input size 16", "32"),
        (["--scheme", "shuffle"], "scheme shuffle+scramble", "shuffle"),
        (["--block-size", "8"], "block size 4", "8"),
    ],
)
def test_encrypt_refuses_what_the_key_does_not_pin(
    tmp_path: Path, capsys, flags: list[str], pinned: str, asked: str
) -> None:
    key = pinned_key(tmp_path / "pinned.key", "shuffle+scramble", 4, 16)
    photos(tmp_path / "src")
    err = one_line_error(["encrypt", tmp_path / "src", tmp_path / "enc", "--key", key, *flags], capsys)
    assert f"key file {key} pins {pinned}, not {asked}" in err
    assert not (tmp_path / "enc").exists()


def test_encrypt_accepts_flags_that_agree_with_the_pin(tmp_path: Path, capsys) -> None:
    key = pinned_key(tmp_path / "pinned.key", "shuffle", 4, 16)
    photos(tmp_path / "src")
    argv = ["encrypt", tmp_path / "src", tmp_path / "enc", "--key", key, "--size", "16", "--block-size", "4"]
    assert run_cli([*argv, "--scheme", "Shuffle"], capsys)[0] == 0  # the scheme as Scheme.parse reads it


def test_train_takes_the_pin_as_its_default(tmp_path: Path, toy_dataset: Path, capsys) -> None:
    key = pinned_key(tmp_path / "pinned.key", "shuffle+scramble", 8, 16)
    argv = ["train", "--data", toy_dataset, "--key", key, "--model", SMALL, "--out", tmp_path / "run"]
    argv += ["--epochs", "1", "--batch-size", "8", "--precision", "no", "--train-subset", "32"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "adapter" / "ppvit_adapter.json").read_text())
    assert (meta["scheme"], meta["block_size"], meta["model_kwargs"]) == ("shuffle+scramble", 8, {"img_size": 16})
    assert meta["key_fingerprint"] == Key.load(key).fingerprint


@pytest.mark.parametrize(
    ("flags", "pinned", "asked"),
    [
        (["--img-size", "32"], "input size 16", "32"),
        (["--scheme", "shuffle"], "scheme shuffle+scramble", "shuffle"),
        (["--block-size", "4"], "block size 8", "4"),
    ],
)
def test_train_refuses_what_the_key_does_not_pin(
    tmp_path: Path, toy_dataset: Path, capsys, flags: list[str], pinned: str, asked: str
) -> None:
    key = pinned_key(tmp_path / "pinned.key", "shuffle+scramble", 8, 16)
    argv = ["train", "--data", toy_dataset, "--key", key, "--model", SMALL, "--out", tmp_path / "run", *flags]
    err = one_line_error(argv, capsys)
    assert f"key file {key} pins {pinned}, not {asked}" in err
    assert not (tmp_path / "run").exists()


def test_predict_refuses_an_adapter_trained_under_other_settings_than_the_key_pins(
    tmp_path: Path, toy_dataset: Path, capsys
) -> None:
    """An adapter that a pinned key's fingerprint matches, trained (by a ppvit that ignored pins) at block 4."""
    key = pinned_key(tmp_path / "pinned.key", "shuffle", 8, 32)
    run = toy_run(tmp_path / "run", "shuffle", 4, Key.load(key).fingerprint)
    image = next((toy_dataset / "test").rglob("*.png"))
    err = one_line_error(["predict", run, image, "--key", key], capsys)
    assert f"key file {key} pins block size 8, not 4" in err
    ok = toy_run(tmp_path / "ok", "shuffle", 8, Key.load(key).fingerprint)
    code, out, err = run_cli(["predict", ok, image, "--key", key], capsys)
    assert code == 0 and out.startswith(f"{image}\tclass"), err


def test_client_train_refuses_what_the_key_does_not_pin_before_encrypting(tmp_path: Path, capsys) -> None:
    key = pinned_key(tmp_path / "pinned.key", "shuffle", 4, 16)
    photos(tmp_path / "src")
    (tmp_path / "t.token").write_text("x")
    argv = ["client", "train", tmp_path / "src", "--key", key, "--work", tmp_path / "work", "--model", SMALL]
    argv += ["--server", "http://127.0.0.1:9", "--token-file", tmp_path / "t.token", "--img-size", "32"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.splitlines()[-1].endswith(f"key file {key} pins input size 16, not 32"), err
    assert not (tmp_path / "work").exists()


def test_a_key_names_its_file_and_is_equal_whatever_its_file() -> None:
    pin = Geometry("shuffle", 4, 16)
    key = Key(bytes(range(32)), pin)
    with pytest.raises(PinError, match=r"^the key pins block size 4, not 8$"):
        key.settle("block_size", 8)
    assert key.settle("block_size", None) == 4 and key.settle("scheme", None) == "shuffle"
    assert Key(bytes(range(32)), pin, source="a.key") == key


def test_keygen_refuses_to_pin_an_input_size_no_image_could_be_resized_to(tmp_path: Path, capsys) -> None:
    """A key pinning a side of 100,000 made every encrypt with it allocate 120 GB for one image's resize, then
    print a traceback (hostile tester)."""
    one_line_error(
        ["keygen", tmp_path / "k.key", "--scheme", "shuffle", "--block-size", "16", "--size", "100000"],
        capsys,
        "input size 100000: at most 4096",
    )
    assert not (tmp_path / "k.key").exists()
    assert Geometry("shuffle", 16, 4096).input_size == 4096  # the bound itself is allowed
