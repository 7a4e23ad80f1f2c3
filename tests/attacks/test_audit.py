"""``ppvit audit`` end to end (report, figure, no key material), and weight leakage from what training produced."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from conftest import SMALL, assert_no_key_material, train_config

from ppvit import cli
from ppvit.attacks import audit
from ppvit.crypto.keys import Key


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
    assert "brightness thumbnail PSNR inf dB" in printed.out
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
