"""`ppvit audit --ciphertext-only` and the per-block steps of ciphertext-only key recovery."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, assert_no_key_material
from PIL import Image
from test_key_recovery import key, smooth_images

from ppvit import cli
from ppvit.attacks import key_recovery as kr
from ppvit.attacks.audit import plan_accuracy, upscale
from ppvit.crypto.ciphers import compile_plan


def image_folder(root: Path, images: np.ndarray) -> Path:
    """An ImageFolder tree with a test/ split of two classes holding ``images``."""
    for i, img in enumerate(images):
        folder = root / "test" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    return root


def blocky_photos(n: int, size: int, seed: int) -> np.ndarray:
    """A random 3x3 brightness and colour field upscaled bicubically, plus finer smooth detail:
    neighbouring blocks share brightness and gradients, as in photographs (the per-block
    negation is found from that; :func:`smooth_images` alone varies too fast between blocks)."""
    coarse = upscale(np.ascontiguousarray(smooth_images(n, 12, seed=seed)[:, ::4, ::4]), size, "bicubic")
    detail = smooth_images(n, size, seed=seed + 100).astype(np.float64)
    return np.clip(coarse + 0.3 * (detail - detail.mean()), 0, 255).round().astype(np.uint8)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "fixed.key"
    path.parent.mkdir()
    KEY.save(path)  # a fixed key: the attack's result is the same on every run
    return path


def test_cli_recovers_shuffle_exactly_and_writes_no_key_material(
    tmp_path: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder(tmp_path / "data", smooth_images(20, 64, seed=11))
    out = tmp_path / "out"
    args = ["audit", "--ciphertext-only", "2,16", "--key", str(key_path), "--data", str(data), "--size", "64"]
    args += ["--block-size", "8", "--images", "4", "--scheme", "shuffle", "--scheme", "rotate+shuffle"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    assert report["key_fingerprints"] == [KEY.fingerprint] and report["keys"] == "given"
    shuffle, hidden = report["schemes"]
    assert shuffle["status"] == "attacked"
    by_n = {r["n"]: r for r in shuffle["runs"]}
    assert (by_n[16]["exact"], by_n[16]["psnr_db"]) == (1.0, "inf")  # all 192 values, held-out images exact
    assert by_n[2]["exact"] < 1.0  # two ciphertexts are not enough: the score can fail
    assert [s["n"] for s in shuffle["summary"]] == [2, 16] and shuffle["summary"][1]["keys_exact"] == 1
    assert hidden["status"].startswith("not attacked: rotate before shuffle")
    assert (out / "ciphertext-only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = printed.out.splitlines()
    assert any(line.split()[:4] == ["shuffle", "16", "1/1", "1/1"] for line in lines)
    assert any(line.startswith("rotate+shuffle") and "not attacked" in line for line in lines)
    assert_no_key_material([out, printed.out, printed.err], KEY)


@pytest.mark.parametrize("value", ["5,x", "0", "5,,10"])
def test_a_bad_count_is_one_clear_error(tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["audit", "--ciphertext-only", value, "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--ciphertext-only" in err and repr(value) in err
    assert not (tmp_path / "audit.json").exists()


def test_noise_images_give_a_low_score() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    cfg = kr.CiphertextOnlyConfig(size=32, block_size=4, images=4)
    report = kr.ciphertext_only_audit(noise, ["shuffle"], [16], [key(9)], cfg)["ciphertext_only"]
    (summary,) = report["schemes"][0]["summary"]
    assert summary["keys_exact"] == 0 and summary["mean_up_to_symmetry"] < 0.3
    assert summary["median_psnr_db"] < 20


def test_rotation_and_channel_order_per_block_are_recovered() -> None:
    """Each block position has its own rotation and channel order: pooled per position across
    images, the blocks are aligned to one map, then the shuffle falls as before."""
    images = smooth_images(20, 64, seed=64 + 8)
    scheme, p = "shuffle+rotate+channel", 8
    truth = compile_plan(key(72), scheme, p, images.shape[1:])
    assert plan_accuracy(compile_plan(key(72), "shuffle", p, images.shape[1:]), truth) < 0.2
    guess = kr.recover_plan(truth.apply_numpy(images[:16]), scheme, p, seed=np.random.default_rng(1))
    score = kr.score_recovery(guess, truth, scheme, p, images[16:])
    assert (score.exact, score.psnr_db) == (1.0, math.inf)


def test_negation_per_block_is_found_from_neighbouring_blocks() -> None:
    images = blocky_photos(40, 64, seed=3)
    p = 8
    truth = compile_plan(key(13), "shuffle+negpos", p, images.shape[1:])
    enc = truth.apply_numpy(images[:32])
    negated = truth.invert.reshape(8, p, 8, p, 3).all((1, 3, 4)).ravel()
    assert 0 < negated.sum() < len(negated)
    found = kr.negated_blocks(kr.to_blocks(enc, p))
    assert np.array_equal(found, negated) or np.array_equal(found, ~negated)  # relative to block 0
    noise = np.random.default_rng(1).integers(0, 256, enc.shape, dtype=np.uint8)
    assert (
        0.25
        < (kr.negated_blocks(kr.to_blocks(noise ^ truth.invert.reshape(64, 64, 3) * 255, p)) == negated).mean()
        < 0.75
    )


def test_full_etc_is_recovered_from_smooth_photographs() -> None:
    images = blocky_photos(40, 64, seed=5)
    scheme, p = "shuffle+scramble+rotate+negpos+channel", 8
    truth = compile_plan(key(16), scheme, p, images.shape[1:])
    guess = kr.recover_plan(truth.apply_numpy(images[:24]), scheme, p)
    score = kr.score_recovery(guess, truth, scheme, p, images[24:])
    assert score.up_to_symmetry == 1.0 and score.symmetry in ("block identity", "image flip")
