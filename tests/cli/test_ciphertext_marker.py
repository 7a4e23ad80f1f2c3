"""Ciphertext is never encrypted twice (issue 29, item 3): `encrypt` marks the PNGs it writes, and `predict`
and the client take a marked file (or one under an encrypted folder's manifest) as ciphertext when its key
fingerprint is the model's, and refuse it, naming the file, otherwise."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from cli_tools import toy_run
from conftest import assert_no_key_material, one_line_error, run_cli
from PIL import Image
from test_cli_encrypt import make_tree

from ppvit.crypto.keys import Key
from ppvit.data.images import ciphertext_origin
from ppvit.data.manifest import MARKER
from ppvit.serve.client import Client


@pytest.fixture
def world(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> dict:
    """The toy test split encrypted with the session key (shuffle, blocks of 4), and a model trained on that key."""
    test = tmp_path / "plain"
    shutil.copytree(toy_dataset / "test", test / "test")
    code, _, err = run_cli(["encrypt", test, tmp_path / "enc", "--key", key_file, "--block-size", "4"], capsys)
    assert code == 0, err
    run = toy_run(tmp_path / "run", "shuffle", 4, Key.load(key_file).fingerprint)
    rels = sorted(p.relative_to(test).as_posix() for p in test.rglob("*.png"))[::8]  # one of each class
    return {"plain": test, "enc": tmp_path / "enc", "run": run, "rels": rels}


def predictions(out: str) -> list[str]:
    """The class and probability of each printed line (the file names differ)."""
    return [line.split("\t", 1)[1] for line in out.splitlines()]


def test_encrypt_marks_its_pngs_with_the_fingerprint_and_geometry_not_the_key(
    world: dict, key_file: Path, tmp_path: Path, capsys
) -> None:
    png = world["enc"] / world["rels"][0]
    marker = json.loads(Image.open(png).text[MARKER])
    fingerprint = Key.load(key_file).fingerprint
    assert marker == {"key_fingerprint": fingerprint, "scheme": "shuffle", "block_size": 4, "size": None}
    assert_no_key_material(world["enc"], Key.load(key_file))
    assert run_cli(["decrypt", world["enc"], tmp_path / "dec", "--key", key_file], capsys)[0] == 0
    assert MARKER not in Image.open(tmp_path / "dec" / world["rels"][0]).text  # plain output carries none


def test_predict_takes_marked_ciphertext_as_ciphertext(world: dict, key_file: Path, tmp_path: Path, capsys) -> None:
    """The issue: predict on an encrypted file with --key encrypted it again and answered with confidence."""
    plain = [world["plain"] / r for r in world["rels"]]
    code, want, err = run_cli(["predict", world["run"], *plain, "--key", key_file], capsys)
    assert code == 0, err
    # a copy away from its folder still carries the marker
    loose = tmp_path / "loose"
    loose.mkdir()
    copies = [shutil.copy(world["enc"] / r, loose / f"{i}.png") for i, r in enumerate(world["rels"])]
    for files in ([world["enc"] / r for r in world["rels"]], copies):
        code, got, err = run_cli(["predict", world["run"], *files, "--key", key_file], capsys)
        assert code == 0, err
        assert predictions(got) == predictions(want)
    # no key is needed for ciphertext
    code, got, err = run_cli(["predict", world["run"], *copies], capsys)
    assert code == 0 and predictions(got) == predictions(want), err


def test_predict_knows_ciphertext_by_its_folders_manifest_without_the_marker(
    world: dict, key_file: Path, capsys
) -> None:
    """ppvit before the marker wrote unmarked PNGs: the manifest of the folder they are in says what they are."""
    files = [world["enc"] / r for r in world["rels"]]
    for f in files:
        Image.open(f).convert("RGB").save(f)  # re-saved: no text chunk
        assert MARKER not in Image.open(f).text
    plain = [world["plain"] / r for r in world["rels"]]
    code, want, _ = run_cli(["predict", world["run"], *plain, "--key", key_file], capsys)
    code, got, err = run_cli(["predict", world["run"], *files, "--key", key_file], capsys)
    assert code == 0 and predictions(got) == predictions(want), err
    origin = ciphertext_origin(files[0])
    assert origin is not None and origin.key_fingerprint == Key.load(key_file).fingerprint


def test_predict_refuses_ciphertext_under_another_key_naming_the_file(
    world: dict, key_file: Path, tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other.key"
    Key.generate().save(other)
    code, _, err = run_cli(["encrypt", world["plain"], tmp_path / "enc2", "--key", other, "--block-size", "4"], capsys)
    assert code == 0, err
    good = world["plain"] / world["rels"][0]
    foreign = tmp_path / "enc2" / world["rels"][1]
    code, out, err = run_cli(["predict", world["run"], good, foreign, "--key", key_file], capsys)
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good)]
    assert str(foreign) in err and Key.load(other).fingerprint in err and "not" in err
    # a model trained on plain images takes no ciphertext either
    plain_run = toy_run(tmp_path / "plain-run", None, None, None)
    code, out, err = run_cli(["predict", plain_run, world["enc"] / world["rels"][0]], capsys)
    assert code == 1 and out == "" and "plain images" in err


def test_the_client_sends_marked_ciphertext_as_it_is(world: dict, key_file: Path, tmp_path: Path, capsys) -> None:
    key = Key.load(key_file)
    posted: list[np.ndarray] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/adapter":
            info = {"scheme": "shuffle", "block_size": 4, "input_size": 32, "key_fingerprint": key.fingerprint}
            return httpx.Response(200, json={**info, "version": 1, "max_images": 8})
        posted.append(np.load(io.BytesIO(request.read())))
        answer = {"label": "x", "index": 0, "probability": 1.0, "top": [{"label": "x", "index": 0, "probability": 1.0}]}
        return httpx.Response(200, json={"version": 1, "predictions": [answer] * len(posted[-1])})

    enc = world["enc"] / world["rels"][0]
    plain = world["plain"] / world["rels"][0]
    other = tmp_path / "other.key"
    Key.generate().save(other)
    assert run_cli(["encrypt", plain, tmp_path / "foreign", "--key", other, "--block-size", "4"], capsys)[0] == 0
    foreign = tmp_path / "foreign" / plain.name
    with Client("http://fake", "t", transport=httpx.MockTransport(handle)) as c:
        c.predict([enc, plain], key)
        ciphertext = np.asarray(Image.open(enc).convert("RGB"))
        np.testing.assert_array_equal(posted[0][0], ciphertext)  # not encrypted again
        np.testing.assert_array_equal(posted[0][1], ciphertext)  # the plain file, encrypted here
        with pytest.raises(ValueError, match=f"{foreign}.*{Key.load(other).fingerprint}"):
            c.predict([foreign], key)
    assert len(posted) == 1  # nothing sent for the foreign ciphertext


@pytest.mark.parametrize("fmt", ["png", "npz", "wds"])
def test_an_encrypted_folder_is_neither_encrypted_nor_previewed_again(
    tmp_path: Path, key_file: Path, capsys, fmt: str
) -> None:
    """``encrypt ENC ENC2`` and ``preview ENC`` encrypted ciphertext a second time, exit 0 (hostile tester): refused
    naming the folder; decrypt is the verb for it, and its output (scheme plain) is encrypted as any plain images."""
    make_tree(tmp_path / "src", n=1, size=16)
    enc, base = tmp_path / "enc", ["--key", key_file, "--block-size", "4"]
    assert run_cli(["encrypt", tmp_path / "src", enc, "--format", fmt, *base], capsys)[0] == 0
    preview = ["preview", enc, tmp_path / "p.png", *base, "--size", "16"]
    for argv in (["encrypt", enc, tmp_path / "enc2", *base], preview):
        one_line_error(argv, capsys, f"source {enc}: is ciphertext", "`ppvit decrypt` is the verb for it")
    assert not (tmp_path / "enc2").exists() and not (tmp_path / "p.png").exists()
    assert run_cli(["decrypt", enc, tmp_path / "dec", "--key", key_file], capsys)[0] == 0
    assert run_cli(["encrypt", tmp_path / "dec", tmp_path / "enc2", *base], capsys)[0] == 0
