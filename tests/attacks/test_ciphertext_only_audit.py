"""`ppvit audit --ciphertext-only`, and the score of a recovered plan against the key (it adds up, and can fail)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from attack_images import key, smooth_images
from conftest import KEY, assert_no_key_material
from PIL import Image

from ppvit import cli
from ppvit.attacks.ciphertext_only_audit import CiphertextOnlyConfig, ciphertext_only_audit, score_recovery
from ppvit.attacks.orientation import block_symmetry_index, image_symmetry_index, then
from ppvit.crypto.ciphers import Plan, compile_plan

# -- the score --------------------------------------------------------------------------------------


def test_score_of_a_plan_with_two_values_swapped() -> None:
    truth = compile_plan(key(1), "shuffle", 4, (16, 16, 3))
    n = truth.index.size
    swapped = truth.index.copy()
    swapped[[5, 70]] = swapped[[70, 5]]
    guess = Plan(truth.shape, swapped, None)
    held = smooth_images(2, 16, seed=1)
    score = score_recovery(guess, truth, "shuffle", 4, held)
    assert score.exact == pytest.approx((n - 2) / n)
    assert score.up_to_symmetry == pytest.approx((n - 2) / n)
    assert score.symmetry == "block identity"
    perfect = score_recovery(truth, truth, "shuffle", 4, held)
    assert (perfect.exact, perfect.psnr_db, perfect.ssim) == (1.0, math.inf, pytest.approx(1.0))
    red_blue = then(truth, np.arange(n).reshape(16, 16, 3)[..., ::-1].reshape(-1))  # decrypts to BGR
    score = score_recovery(red_blue, truth, "shuffle", 4, held)
    assert (score.exact, score.up_to_symmetry, score.up_to_colours) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 1.0)


def test_score_forgives_block_orientation_and_for_scramble_the_mirror() -> None:
    shape, p = (16, 16, 3), 4
    secret = key(2)
    truth = compile_plan(secret, "shuffle", p, shape)
    turned = then(truth, block_symmetry_index(shape, p, 1))  # decrypts to every block turned 90 degrees
    held = smooth_images(2, 16, seed=2)
    score = score_recovery(turned, truth, "shuffle", p, held)
    assert score.exact < 0.2
    assert (score.up_to_symmetry, score.symmetry) == (1.0, "block rot90")
    assert score.psnr_db < 40 and score.psnr_db_up_to_symmetry == math.inf

    truth = compile_plan(secret, "shuffle+scramble", p, shape)
    mirrored = then(truth, image_symmetry_index(shape, 4))
    score = score_recovery(mirrored, truth, "shuffle+scramble", p, held)
    assert score.exact < 0.2
    assert (score.up_to_symmetry, score.symmetry) == (1.0, "image flip")
    # a mirror is no excuse for shuffle alone: blocks stay in place, so it shows at their edges
    assert score_recovery(mirrored, truth, "shuffle", p, held).up_to_symmetry < 0.5


# -- the audit --------------------------------------------------------------------------------------


def image_folder(root: Path, images: np.ndarray) -> Path:
    """An ImageFolder tree with a test/ split of two classes holding ``images``."""
    for i, img in enumerate(images):
        folder = root / "test" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "fixed.key"
    path.parent.mkdir()
    KEY.save(path)  # a fixed key: the attack's result is the same on every run
    return path


def test_cli_recovers_shuffle_exactly_and_writes_no_key_material(
    tmp_path: Path, key_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = image_folder(tmp_path / "data", smooth_images(20, 64, seed=11))
    out = tmp_path / "out"
    args = ["audit", "--ciphertext-only", "2,16", "--key", str(key_path), "--data", str(data), "--size", "64"]
    args += ["--block-size", "8", "--images", "4", "--scheme", "shuffle", "--scheme", "rotate+shuffle"]
    with caplog.at_level(logging.INFO):
        assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert [r.getMessage() for r in caplog.records if "no manifest" in r.getMessage()] == [
        f"{data}: plain images (no manifest): encrypted here under the given key, then attacked"
    ]
    report = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    assert report["attacked"] == "simulated"
    assert report["key_fingerprints"] == [KEY.fingerprint] and report["keys"] == "given"
    shuffle, hidden = report["schemes"]
    assert shuffle["status"] == "attacked"
    by_n = {r["n"]: r for r in shuffle["runs"]}
    assert (by_n[16]["exact"], by_n[16]["psnr_db"]) == (1.0, "inf")  # all 192 values, held-out images exact
    assert by_n[2]["exact"] < 1.0  # two ciphertexts are not enough: the score can fail
    assert [s["n"] for s in shuffle["summary"]] == [2, 16] and shuffle["summary"][1]["keys_exact"] == 1
    assert hidden["status"].startswith("not attacked: rotate before shuffle")
    assert (out / "ciphertext-only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "audit.png").exists()
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
    cfg = CiphertextOnlyConfig(size=32, block_size=4, images=4)
    report = ciphertext_only_audit(noise, ["shuffle"], [16], [key(9)], cfg)["ciphertext_only"]
    (summary,) = report["schemes"][0]["summary"]
    assert summary["keys_exact"] == 0 and summary["mean_up_to_symmetry"] < 0.3
    assert summary["median_psnr_db"] < 20


def test_progress_is_shown_per_attack(capsys: pytest.CaptureFixture[str]) -> None:
    """The audit said nothing until its end; with progress it counts the attacks (scheme x N x key) as they go."""
    images = smooth_images(12, 32, seed=1)
    cfg = CiphertextOnlyConfig(size=32, block_size=4, images=4)
    ciphertext_only_audit(images, ["shuffle", "rotate"], [2, 4], [key(1), key(2)], cfg, progress=True)
    err = capsys.readouterr().err
    assert "ciphertext-only attacks" in err and "8/8" in err and "shuffle, N=4" in err
    ciphertext_only_audit(images, ["shuffle"], [2], [key(1)], cfg)
    assert capsys.readouterr().err == ""  # a library call is silent unless asked


def test_the_table_says_a_mirrored_key_is_readable() -> None:
    """`shuffle+scramble` at N=20, "0/1 exact, 1/1 up to sym.", read as worse than N=5's exact key: the table
    says what a mirror costs the user (nothing: a mirror image is fully readable)."""
    from ppvit.attacks.ciphertext_only_audit import _summary
    from ppvit.attacks.report import format_report

    def run(n: int, exact: float, symmetry: str, readable: str | None) -> dict:
        return {"n": n, "exact": exact, "up_to_symmetry": 1.0 if readable else 0.4, "symmetry": symmetry}

    runs = {
        5: [run(5, 1.0, "block identity", "exact")],
        20: [run(20, 0.02, "image flip", "mirrored"), run(20, 0.3, "block identity", None)],
    }
    for rs in runs.values():
        for r in rs:
            r.update(psnr_db=math.inf if r["exact"] == 1 else 11.0, ssim=0.5, seconds=1.0)
            r["readable_as"] = {1.0: "exact", 0.02: "mirrored"}.get(r["exact"])
    summaries = [_summary(n, rs) for n, rs in runs.items()]
    assert summaries[1]["keys_readable"] == 1 and summaries[1]["readable_as"] == {"mirrored": 1}
    co = {"size": 64, "block_size": 8, "resize": "bicubic", "key_fingerprints": ["a", "b"], "keys": "fresh"}
    scheme = {"scheme": "shuffle+scramble", "status": "attacked", "summary": summaries}
    co |= {"held_out_images": 4, "schemes": [scheme]}
    lines = format_report({"ciphertext_only": co}).splitlines()
    assert lines[1].split()[:6] == ["scheme", "N", "exact", "readable", "as", "what"]
    assert lines[2].split()[:6] == ["shuffle+scramble", "5", "1/1", "1/1", "1", "exact"]
    assert lines[3].split()[:6] == ["shuffle+scramble", "20", "0/2", "1/2", "1", "mirrored"]
    legend = " ".join(lines[4:])
    assert "mirrored" in legend and "as readable as the original" in legend and "chance" in legend
