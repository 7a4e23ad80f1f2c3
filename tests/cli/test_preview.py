"""``ppvit preview`` and ``ppvit encrypt-demo`` against a hostile tester's inputs: what they may overwrite, the
sizes they take, a pinned key, the dense mixings, a wrong ``--data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_tools import pinned_key
from conftest import one_line_error, run_cli
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key


def tree(root: Path, classes: int = 3, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / "test" / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / "test" / f"c{c}" / "0.jpg")
    return root


@pytest.mark.parametrize(
    ("out", "says"),
    [
        ("k.key", "a preview is a .png file"),  # the key given as the output: its secret was gone, exit 0
        ("src/test/c0/0.jpg", "a preview is a .png file"),  # a source image replaced by the grid
        ("mine.png", "exists and is not a preview written by ppvit"),  # someone's picture
    ],
    ids=["the key", "a source image", "another png"],
)
def test_a_preview_never_replaces_a_file_it_did_not_write(tmp_path: Path, capsys, out: str, says: str) -> None:
    tree(tmp_path / "src")
    Key.generate().save(tmp_path / "k.key")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "mine.png")
    before = (tmp_path / out).read_bytes()
    argv = ["preview", tmp_path / "src", tmp_path / out, "--key", tmp_path / "k.key", "--size", "16"]
    one_line_error([*argv, "--block-size", "4"], capsys, says)
    assert (tmp_path / out).read_bytes() == before


def test_a_preview_replaces_its_own_earlier_grid_and_shows_the_mixings(tmp_path: Path, capsys) -> None:
    """``--schemes mix,lift`` was a TypeError's traceback (float16 ciphertext handed to PIL): stretched to 0-255."""
    tree(tmp_path / "src")
    Key.generate().save(tmp_path / "k.key")
    argv = ["preview", tmp_path / "src", tmp_path / "p.png", "--key", tmp_path / "k.key", "--size", "16"]
    assert run_cli([*argv, "--block-size", "4"], capsys)[0] == 0
    code, _, err = run_cli([*argv, "--block-size", "4", "--schemes", "mix,lift"], capsys)
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert grid.shape[0] == 3 * (128 + 4)  # plain, mix, lift: three rows of 16 px zoomed to 128
    images = np.stack([np.asarray(Image.open(tmp_path / "src" / "test" / f"c{c}" / "0.jpg")) for c in range(3)])
    mixed = BlockCipher(Key.load(tmp_path / "k.key"), "mix", 4).encrypt(images).astype(np.float64)
    stretched = ((mixed - mixed.min()) / (mixed.max() - mixed.min()) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[132:260:8, 150:278:8], stretched[0])  # the first tile, zoomed 8x


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--n", "0"], "--n 0: from 1 to 64"),  # an IndexError's traceback
        (["--n", "100000"], "--n 100000: from 1 to 64"),  # every image decoded and pasted: 22 GB on CIFAR-10
        (["--size", "0"], "--size 0: from 1 to 4096"),  # a RuntimeError's traceback
        (["--size", "-5"], "--size -5: from 1 to 4096"),
    ],
)
def test_preview_sizes_are_bounded_in_one_line(tmp_path: Path, capsys, extra: list[str], says: str) -> None:
    tree(tmp_path / "src")
    Key.generate().save(tmp_path / "k.key")
    one_line_error(["preview", tmp_path / "src", tmp_path / "p.png", "--key", tmp_path / "k.key", *extra], capsys, says)
    assert not (tmp_path / "p.png").exists()


def test_preview_takes_a_keys_pin_as_its_default_and_refuses_anything_else(tmp_path: Path, capsys) -> None:
    """It drew every scheme at 224 and took ``--size 64`` from a key pinned to shuffle in blocks of 4 at 16."""
    tree(tmp_path / "src", side=20)
    key = pinned_key(tmp_path / "pin.key", "shuffle", 4, 16)
    base = ["preview", tmp_path / "src", tmp_path / "p.png", "--key", key]
    one_line_error([*base, "--size", "64"], capsys, "pins input size 16, not 64")
    one_line_error([*base, "--schemes", "shuffle,rotate"], capsys, "pins scheme shuffle, not rotate")
    assert run_cli(base, capsys)[0] == 0
    grid = Image.open(tmp_path / "p.png")
    assert grid.size[1] == 2 * (128 + 4)  # plain and the pinned scheme, 16 px zoomed to 128


@pytest.mark.parametrize(("layout", "says"), [(None, "nothere"), ("train", "nothere: no readable images under test/")])
def test_encrypt_demo_makes_no_key_before_its_data_are_read(tmp_path: Path, capsys, layout: str | None, says) -> None:
    """A wrong ``--data`` (none there, or no test/ split) left ``OUT/demo.key``, and the corrected command was refused
    for it ("already exists")."""
    if layout is not None:  # its images in another split
        tree(tmp_path / "nothere").joinpath("test").rename(tmp_path / "nothere" / layout)
    one_line_error(["encrypt-demo", "--data", tmp_path / "nothere", "--out", tmp_path / "demo"], capsys, says)
    assert not (tmp_path / "demo").exists()
    one_line_error(["encrypt-demo", "--data", tmp_path / "nothere", "--n", "5"], capsys, "--n 5: from 10 to 10000")
