"""`ppvit audit` and `ppvit transform-model` given what a user can get wrong (hostile tester, session 20): a
folder of the user's own files, an output overlapping the data or the inputs, sizes that cannot be, a key's pin."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from cli_tools import toy_run
from conftest import SMALL, one_line_error, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ppvit.crypto.keys import Geometry, Key
from ppvit.models.adapters import CONFIG_NAME, WEIGHTS_NAME
from ppvit.models.backbones import create_backbone


def test_audit_never_deletes_files_it_did_not_write(tmp_path: Path, toy_dataset: Path, capsys) -> None:
    """`--out myproj` deleted myproj/recovered/holiday/beach.png (exit 0): an audit's PNGs were any PNG there."""
    photo = tmp_path / "myproj" / "recovered" / "holiday" / "beach.png"
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photo)
    argv = ["audit", "--ciphertext-only", "5", "--data", toy_dataset, "--out", tmp_path / "myproj"]
    one_line_error(argv, capsys, f"--out {tmp_path / 'myproj'}: holds other files and no audit.json")
    assert photo.is_file()


@pytest.mark.parametrize("inside", [".", "audit"], ids=["the data folder", "a folder in it"])
def test_audit_writes_nothing_into_the_data_it_attacks(tmp_path: Path, capsys, inside: str) -> None:
    """`--out ENC` wrote decrypted images into the encrypted dataset; its next audit failed on them."""
    data = tmp_path / "enc"
    (data / "test" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "test" / "c" / "x.png")
    before = sorted(data.rglob("*"))
    argv = ["audit", "--ciphertext-only", "5", "--data", data, "--out", data / inside]
    one_line_error(argv, capsys, f"overlaps --data {data}")
    assert sorted(data.rglob("*")) == before


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--size", "40000"], "--size 40000, --block-size 16: input size 40000: at most 4096"),
        (["--size", "30", "--block-size", "8"], "input size 30 is not a multiple of block size 8"),
        (["--ciphertext-only", "5", "--size", "40000"], "input size 40000: at most 4096"),
        (["--pairs", "x"], "--pairs: expected comma-separated positive numbers"),
        (["--pairs", "0"], "--pairs: expected comma-separated positive numbers"),
    ],
    ids=["size huge", "size not a multiple", "ciphertext-only size huge", "pairs text", "pairs 0"],
)
def test_audit_sizes_and_counts_that_cannot_be_are_one_line(
    tmp_path: Path, toy_dataset: Path, capsys, flags: list[str], says: str
) -> None:
    """--size 40000 tried a 57.6 GB allocation (a traceback); --size 30 --block-size 8 said "cannot reshape"."""
    one_line_error(["audit", "--data", toy_dataset, "--out", tmp_path / "o", *flags], capsys, says)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--size", "--block-size", "--images", "--every", "--keys"])
def test_audit_counts_below_1_are_refused_by_the_parser(tmp_path: Path, capsys, flag: str) -> None:
    """--size 0 and --block-size 0 ran at 224/16 (exit 0); --every 0 divided by zero after training began."""
    with pytest.raises(SystemExit) as stopped:
        run_cli(["audit", "--out", tmp_path / "o", flag, "0"], capsys)
    assert stopped.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_audit_follows_the_key_pin(tmp_path: Path, toy_dataset: Path, capsys) -> None:
    """A key pinned to 32 pixels was audited at 224/16."""
    key = tmp_path / "k.key"
    Key.generate(Geometry("shuffle", 8, 32)).save(key)
    argv = ["audit", "--data", toy_dataset, "--key", key, "--out", tmp_path / "o", "--size", "64"]
    one_line_error(argv, capsys, "pins input size 32, not 64")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A 10-class micro ViT's weights."""
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(create_backbone(SMALL, num_classes=10).state_dict(), str(path))
    return path


def test_transform_model_never_writes_over_its_inputs(tmp_path: Path, weights: Path, capsys) -> None:
    """`--force` onto the key file replaced the key with a 22 MB model (the key lost)."""
    key = tmp_path / "k.key"
    Key.generate().save(key)
    secret = key.read_bytes()
    for target, flag in ((key, "--key"), (weights, "--weights")):
        argv = ["transform-model", target, "--model", SMALL, "--weights", weights, "--key", key, "--force"]
        one_line_error(argv, capsys, f"output {target}: is the {flag} file")
    assert key.read_bytes() == secret


def test_merge_and_transform_model_replace_only_their_own_earlier_outputs(
    tmp_path: Path, weights: Path, capsys
) -> None:
    """`merge --force` wrote over the adapter it merged, the run's checkpoint, the key file and the base weights, and
    as root over /dev/full (the device node became a regular file); only earlier outputs may be replaced."""
    run = toy_run(tmp_path / "run", None, None, None)
    adapter, key, fifo = run / "adapter", tmp_path / "k.key", tmp_path / "fifo"
    (run / "checkpoint.pt").write_bytes(b"a checkpoint")
    Key.generate().save(key)
    os.mkfifo(fifo)
    kept = {p: p.read_bytes() for p in (adapter / CONFIG_NAME, adapter / WEIGHTS_NAME, run / "checkpoint.pt", key)}
    kept[weights] = weights.read_bytes()
    for target, says in (
        (adapter / WEIGHTS_NAME, "is the adapter's tensors"),
        (adapter / CONFIG_NAME, "is the adapter's config"),
        (run / "checkpoint.pt", "exists and is not a model file ppvit merge or transform-model wrote"),
        (key, "exists and is not a model file"),
        (fifo, "exists and is not a model file"),
        (weights, "exists and is not a model file"),  # timm's weights: no ppvit metadata
    ):
        one_line_error(["merge", run, target, "--force"], capsys, f"output {target}: {says}")
    one_line_error(["merge", run, weights, "--weights", weights, "--force"], capsys, "is the --weights")
    transform = ["--model", SMALL, "--weights", weights, "--key", key, "--force"]
    one_line_error(["transform-model", fifo, *transform], capsys, f"output {fifo}: exists and is not a model file")
    assert all(p.read_bytes() == data for p, data in kept.items()) and stat.S_ISFIFO(fifo.stat().st_mode)
    for out, argv in ((tmp_path / "m.safetensors", ["merge", run]), (tmp_path / "t.safetensors", ["transform-model"])):
        extra = transform[:-1] if argv == ["transform-model"] else []
        assert run_cli([*argv, out, *extra], capsys)[0] == 0
        one_line_error([*argv, out, *extra], capsys, f"output {out}: exists; pass --force")
        assert run_cli([*argv, out, *extra, "--force"], capsys)[0] == 0  # its own earlier output


def test_transform_model_refuses_a_transformed_file_it_cannot_rightly_change(
    tmp_path: Path, weights: Path, capsys
) -> None:
    """`--inverse --key k2` of a model transformed with k1 wrote a model "for plain images, key k2" that is right for
    none, exit 0; a transformed model was transformed a second time (hostile tester)."""
    k1, k2 = tmp_path / "k1.key", tmp_path / "k2.key"
    Key.generate().save(k1)
    Key.generate().save(k2)
    enc, back = tmp_path / "enc.safetensors", tmp_path / "back.safetensors"
    assert run_cli(["transform-model", enc, "--model", SMALL, "--weights", weights, "--key", k1], capsys)[0] == 0
    base = ["--model", SMALL, "--weights", enc]
    one_line_error(["transform-model", back, *base, "--key", k2, "--inverse"], capsys, "transformed with key")
    one_line_error(["transform-model", back, *base, "--key", k1], capsys, "already a model for encrypted images")
    assert not back.exists()
    assert run_cli(["transform-model", back, *base, "--key", k1, "--inverse"], capsys)[0] == 0
    original, undone = load_file(str(weights)), load_file(str(back))
    assert all(torch.allclose(original[k], undone[k], atol=1e-6) for k in original)  # the key's own inverse
    base = ["--model", SMALL, "--weights", back, "--inverse"]
    one_line_error(
        ["transform-model", tmp_path / "x.safetensors", *base, "--key", k1], capsys, "already a model for plain"
    )


def test_an_atomic_write_never_replaces_a_device_or_a_fifo(tmp_path: Path) -> None:
    """The rename of an atomic write replaced what was there, a device node too (root: /dev/full)."""
    from ppvit._io import atomic_write_bytes

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="exists and is not a regular file") as refused:
        atomic_write_bytes(tmp_path / "fifo", b"x")
    assert refused.value.filename == str(tmp_path / "fifo") and stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]  # no temporary file left
    atomic_write_bytes(tmp_path / "file", b"x")
    atomic_write_bytes(tmp_path / "file", b"y")
    assert (tmp_path / "file").read_bytes() == b"y"


def test_transform_model_keeps_the_trained_head_and_the_key_pin(tmp_path: Path, weights: Path, capsys) -> None:
    """--num-classes 4 on 10-class weights wrote a new random head; a pinned key's block size was ignored."""
    key = tmp_path / "k.key"
    Key.generate(Geometry("shuffle", 4, 32)).save(key)
    out = tmp_path / "t.safetensors"
    base = ["transform-model", out, "--model", SMALL, "--weights", weights, "--key", key]
    one_line_error([*base, "--num-classes", "4"], capsys, f"weights file {weights}: its head has 10 classes, not 4")
    one_line_error([*base, "--block-size", "8"], capsys, "pins block size 4, not 8")
    assert run_cli(base, capsys)[0] == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert (meta["block_size"], meta["img_size"], meta["scheme"]) == ("4", "32", "shuffle")
