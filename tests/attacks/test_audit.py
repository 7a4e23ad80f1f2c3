"""``ppvit audit`` end to end (report, figure, no key material), and weight leakage from what training produced."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, assert_no_key_material, train_config

from ppvit import cli
from ppvit.attacks import audit
from ppvit.crypto.keys import Key
from ppvit.train.loop import train


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
    assert report["schemes"][0]["ciphertext_only"]["thumbnail_psnr_db"] == "inf"  # shuffle keeps block means
    assert "block brightness as a thumbnail: PSNR inf dB" in printed.out
    # each figure named by its attack: the ciphertext's own statistics are no "ciphertext only" attack result
    assert not [line for line in printed.out.splitlines() if line.strip().lower().startswith("ciphertext only")]
    assert printed.out.count("ciphertext as stored, no attack") == 2 and "--ciphertext-only" in printed.out
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


def test_an_adapter_is_audited_with_its_own_model_and_the_weights_of_ppvit_weights(
    tmp_path: Path, toy_dataset: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit --adapter` asked for --weights although PPVIT_WEIGHTS named them, then for --model although
    the adapter records it: an adapter folder alone (as a server stores it) needs neither."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from ppvit.models.backbones import create_backbone

    weights = tmp_path / "micro.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone(SMALL, num_classes=4).state_dict(), str(weights))
    train(train_config(tmp_path / "run", toy_dataset, key_file, scheme="shuffle", weights=str(weights), epochs=1))
    alone = tmp_path / "served" / "adapter"
    shutil.copytree(tmp_path / "run" / "adapter", alone)  # no run folder, no config.yaml recording the weights
    monkeypatch.setenv("PPVIT_WEIGHTS", str(weights))
    out = tmp_path / "audit"
    args = ["audit", "--key", str(key_file), "--data", str(toy_dataset), "--size", "32", "--block-size", "4"]
    args += ["--pairs", "1", "--images", "2", "--scheme", "shuffle", "--adapter", str(alone), "--out", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "audit.json").read_text())
    assert sorted(report["weights"]) == [f"adapter {alone}", f"shuffle, key-transformed {SMALL}"]
    assert report["weights"][f"shuffle, key-transformed {SMALL}"]["pixel_permutation"] == 1.0
    monkeypatch.setenv("PPVIT_WEIGHTS", str(tmp_path / "other.safetensors"))
    save_file(create_backbone(SMALL, num_classes=4).state_dict(), str(tmp_path / "other.safetensors"))
    refusal = "other.safetensors: not the base model this adapter was trained on"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        audit.weight_leakage_adapter(alone, Key.load(key_file))  # another file: named, checked by its hash


@pytest.mark.parametrize(("key_init", "low", "high"), [(True, 20.0, 99.0), (False, 0.0, 12.0)])
def test_a_mixing_adapter_is_attacked_by_its_patch_embedding(
    tmp_path: Path, toy_dataset: Path, key_file: Path, key_init: bool, low: float, high: float
) -> None:
    """`audit --adapter` on a `mix` run: weight matching has no permutation to find (refused in one line);
    the embedding attack decrypts by the key holder's start (exact, then one epoch of drift: 25 dB
    measured) and not by a patch embedding trained from the public one (6 dB, below the prior's mean
    colour's 8 dB on these noisy images)."""
    from ppvit.attacks.metrics import psnr
    from ppvit.data.datasets import test_images as audit_images  # not collected as a test

    key = Key.load(key_file)
    train(train_config(tmp_path / "run", toy_dataset, key_file, scheme="mix", key_init=key_init, epochs=1))
    with pytest.raises(ValueError, match="a matrix with no permutation to match"):
        audit.weight_leakage_adapter(tmp_path / "run", key)
    images = audit_images(toy_dataset, 12, 32)
    cfg = audit.AuditConfig(size=32, block_size=4, pairs=(8,), images=4)
    found = audit.adapter_leakage(tmp_path / "run", key, images, cfg)
    mean_colour = np.broadcast_to(images[:8].mean((0, 1, 2)).round().astype(np.uint8), images[8:].shape)
    assert low < found["held_out_psnr_db"] < high
    assert (found["held_out_psnr_db"] > psnr(images[8:], mean_colour) + 10) == key_init
