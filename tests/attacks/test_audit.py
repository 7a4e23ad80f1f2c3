"""The attacks of ppvit.attacks.audit work (they can fail: ties, wrong keys), and no output leaks a key."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, assert_no_key_material, train_config

from ppvit import cli
from ppvit.attacks import audit
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.backbones import create_backbone
from ppvit.models.transform import block_map, transform_model


def noise(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("scheme", "size", "p"),
    [("shuffle", 32, 4), ("shuffle", 224, 16), ("shuffle+scramble+negpos:pixel+channel:pixel", 32, 4)],
)
def test_one_pair_recovers_an_absorbable_key_exactly(scheme: str, size: int, p: int) -> None:
    key = Key.generate()
    cipher = BlockCipher(key, scheme, p)
    pair, held = noise(1, size), noise(3, size, seed=1)
    guess = audit.known_plaintext_attack(pair, cipher.encrypt(pair), scheme, p)
    assert audit.plan_accuracy(guess, cipher.plan(size, size)) == 1.0
    np.testing.assert_array_equal(guess.inverse().apply_numpy(cipher.encrypt(held)), held)


def test_per_block_schemes_need_more_pairs_but_fall_too() -> None:
    scheme, key = "shuffle+scramble+rotate+negpos+channel", Key.generate()
    cipher = BlockCipher(key, scheme, 4)
    pairs = noise(8)
    truth = cipher.plan(32, 32)
    one = audit.plan_accuracy(audit.known_plaintext_attack(pairs[:1], cipher.encrypt(pairs[:1]), scheme, 4), truth)
    eight = audit.plan_accuracy(audit.known_plaintext_attack(pairs, cipher.encrypt(pairs), scheme, 4), truth)
    assert one < 0.9  # one 4x4 block of 48 values has too many ties with 256 levels
    assert eight == 1.0


def test_ties_in_flat_images_defeat_the_attack_partly() -> None:
    """A flat image gives no evidence: the attack must not do better than chance there."""
    key = Key.generate()
    cipher = BlockCipher(key, "shuffle", 4)
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    guess = audit.known_plaintext_attack(flat, cipher.encrypt(flat), "shuffle", 4)
    assert audit.plan_accuracy(guess, cipher.plan(32, 32)) < 0.2


def test_a_plan_recovered_for_one_key_does_not_open_another() -> None:
    pair = noise(1)
    a, b = BlockCipher(Key.generate(), "shuffle", 4), BlockCipher(Key.generate(), "shuffle", 4)
    guess = audit.known_plaintext_attack(pair, a.encrypt(pair), "shuffle", 4)
    held = noise(2, seed=3)
    assert audit.psnr(held, guess.inverse().apply_numpy(b.encrypt(held))) < 15


def test_plan_from_maps_rebuilds_a_ciphers_plan() -> None:
    key = Key.generate()
    plan = BlockCipher(key, "scramble+shuffle+negpos:pixel", 4).plan(32, 32)
    bmap = block_map(plan, 4)
    rebuilt = audit.plan_from_maps((32, 32, 3), 4, bmap.sigma, bmap.pi, bmap.inv)
    assert audit.plan_accuracy(rebuilt, plan) == 1.0
    np.testing.assert_array_equal(rebuilt.index, plan.index)


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+scramble", "channel:pixel+scramble"])
def test_weight_matching_recovers_everything_from_a_key_transformed_model(scheme: str) -> None:
    key = Key.generate()
    score = audit.weight_leakage_transformed(SMALL, key, scheme)
    assert score.pixel_permutation == 1.0
    assert score.block_permutation in (None, 1.0)
    assert (score.block_permutation is None) == ("scramble" not in scheme)


def test_weight_matching_finds_nothing_in_an_unrelated_embedding() -> None:
    torch.manual_seed(0)
    public = create_backbone(SMALL, num_classes=0)
    torch.manual_seed(1)
    other = create_backbone(SMALL, num_classes=0)
    key = Key.generate()
    truth = block_map(BlockCipher(key, "shuffle", 4).plan(32, 32), 4)
    transform_model(other, key, "shuffle")
    guess = audit.weight_matching_attack(public.state_dict(), other.state_dict())
    assert audit.MapScore.of(guess, truth).pixel_permutation < 0.2  # 48 columns: chance is about 1/48


def test_psnr_and_ssim_against_hand_arithmetic() -> None:
    a = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 16  # one value off by 16: MSE = 256 / 768
    assert audit.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (256 / 768)))
    assert audit.psnr(a, a) == math.inf
    x, y = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 50, np.uint8)
    c1 = (0.01 * 255) ** 2  # constant images: only the luminance term differs from 1
    assert audit.ssim(x, y) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1))
    img = noise(1)
    assert audit.ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + np.random.default_rng(5).normal(0, 30, img.shape), 0, 255).astype(np.uint8)
    assert 0 < audit.ssim(img, noisy) < 0.95


def test_ciphertext_statistics_show_what_each_scheme_keeps() -> None:
    key, imgs = Key.generate(), noise(2)
    shuffled = audit.ciphertext_stats(imgs, BlockCipher(key, "shuffle", 4).encrypt(imgs), 4)
    assert shuffled["thumbnail_psnr_db"] == math.inf  # block brightness is kept exactly
    assert shuffled["block_histograms_kept"] == 1.0 and shuffled["blocks_verbatim"] == 0.0
    scrambled = audit.ciphertext_stats(imgs, BlockCipher(key, "scramble", 4).encrypt(imgs), 4)
    assert scrambled["blocks_verbatim"] == 1.0 and scrambled["thumbnail_psnr_db"] < 30
    negated = audit.ciphertext_stats(imgs, BlockCipher(key, "negpos", 4).encrypt(imgs), 4)
    assert negated["block_histograms_kept"] < 1.0


def smooth(n: int, size: int = 32) -> np.ndarray:
    """Natural-image-like: random 4x4 colour fields upscaled bicubically (edges continue across blocks)."""
    return audit.upscale(noise(n, 4, seed=3), size, "bicubic")


@pytest.mark.parametrize("scheme", ["scramble", "shuffle+scramble"])
def test_source_blocks_agree_with_the_block_map(scheme: str) -> None:
    plan = BlockCipher(Key.generate(), scheme, 4).plan(32, 32)
    np.testing.assert_array_equal(audit.source_blocks(plan, 4), block_map(plan, 4).sigma)


def test_jigsaw_reassembles_block_scrambling_from_ciphertexts_alone() -> None:
    cipher = BlockCipher(Key.generate(), "scramble", 4)
    sigma = audit.source_blocks(cipher.plan(32, 32), 4)
    assert audit.jigsaw_neighbours(cipher.encrypt(smooth(16)), 4, sigma) > 0.9
    assert audit.jigsaw_neighbours(cipher.encrypt(noise(16)), 4, sigma) < 0.2  # no edges to follow
    rotated = BlockCipher(Key.generate(), "scramble+rotate", 4)
    sigma = audit.source_blocks(rotated.plan(32, 32), 4)
    assert audit.jigsaw_neighbours(rotated.encrypt(smooth(16)), 4, sigma) < 0.5  # edges moved


def test_audit_cli_writes_report_and_figure_without_key_material(
    tmp_path: Path, toy_dataset: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Key.load(key_file)
    out = tmp_path / "audit"
    args = ["audit", "--key", str(key_file), "--data", str(toy_dataset), "--size", "32", "--block-size", "4"]
    args += ["--pairs", "1,2", "--images", "4", "--model", SMALL, "--scheme", "shuffle", "--scheme", "scramble"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "audit.json").read_text())
    assert [s["scheme"] for s in report["schemes"]] == ["shuffle", "scramble"]
    assert report["key_fingerprint"] == key.fingerprint
    assert report["weights"]  # weight matching ran for both (absorbable) schemes
    assert all(w["pixel_permutation"] == 1.0 for w in report["weights"].values())
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_no_key_material([out, printed.out, printed.err], key)
    assert cli.main(["audit", "--scheme", "shuffle+bogus", "--data", str(toy_dataset)]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err
    assert_no_key_material(err, key)


def test_training_outputs_carry_no_key_material_and_leakage_is_tracked(
    tmp_path: Path, toy_dataset: Path, key_file: Path
) -> None:
    """A key-initialised lora-pe run: its weights leak the permutation (by design) but its
    files never hold the key itself; the leakage curve is recorded as training proceeds."""
    key = Key.load(key_file)
    cfg = train_config(tmp_path / "run", toy_dataset, key_file, scheme="shuffle+scramble", key_init=True, epochs=1)
    curve, result = audit.leakage_during_training(cfg, every=3)
    assert [c["step"] for c in curve][:2] == [1, 3]
    assert curve[0]["pixel_permutation"] == 1.0 and curve[0]["block_permutation"] == 1.0
    assert audit.weight_leakage_adapter(tmp_path / "run", key).pixel_permutation > 0.9
    other = Key.generate()
    refusal = f"adapter {tmp_path / 'run' / 'adapter'}: trained with key {key.fingerprint}, not {other.fingerprint}"
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
        audit.weight_leakage_adapter(tmp_path / "run", other)  # another key: refused, both fingerprints named
    assert_no_key_material([tmp_path / "run", json.dumps(dataclasses.asdict(result)), json.dumps(curve)], key)
