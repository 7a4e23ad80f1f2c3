"""Keys: the derivation is version-stable (golden vectors), files are private and checked."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, assert_no_key_material, key_encodings, within_a_minute

from ppvit.crypto.keys import Key, KeyFileError

GOLDEN_SECRET = bytes(range(32))
assert KEY.secret == GOLDEN_SECRET  # the tests' shared key is the golden one


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.astype("<i8").tobytes()).hexdigest()[:16]


# Computed once with ppvit 0.1.0 (derivation v1). If one of these changes, every dataset
# encrypted with an earlier ppvit stops decrypting: do not "update" them, fix the code.
GOLDEN = {
    ("ppvit/v1/shuffle/p=16/c=3", 768): "758f9c2ffe5cf5ac",
    ("ppvit/v1/shuffle/p=4/c=3", 48): "4903a9fe06c3b630",
    ("ppvit/v1/scramble/grid=14x14", 196): "32ce9ebcff02bb76",
}
GOLDEN_FINGERPRINT = "95330a6c4371df34"


@pytest.mark.parametrize(("label", "n"), list(GOLDEN))
def test_golden_permutations(label: str, n: int) -> None:
    perm = Key(GOLDEN_SECRET).permutation(label, n)
    assert sorted(perm.tolist()) == list(range(n))
    assert digest(perm) == GOLDEN[(label, n)]


def test_golden_fingerprint() -> None:
    assert Key(GOLDEN_SECRET).fingerprint == GOLDEN_FINGERPRINT


def test_stream_is_hmac_sha256_counter_mode() -> None:
    """The documented definition, recomputed with the standard library alone."""
    label = "ppvit/v1/test"
    expected = b"".join(
        hmac.new(GOLDEN_SECRET, label.encode() + b"\x00" + i.to_bytes(8, "big"), hashlib.sha256).digest()
        for i in range(3)
    )
    assert Key(GOLDEN_SECRET).stream(label).read(96) == expected


def test_fisher_yates_matches_documented_algorithm() -> None:
    """Re-implement the documented shuffle from raw stream bytes and compare."""
    label, n = "ppvit/v1/fy", 300
    raw = Key(GOLDEN_SECRET).stream(label).read(4 * 4000)
    words = [int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw), 4)]
    items, w = list(range(n)), iter(words)
    for i in range(n - 1, 0, -1):
        m = i + 1
        limit = 2**32 - (2**32 % m)
        u = next(w)
        while u >= limit:
            u = next(w)
        j = u % m
        items[i], items[j] = items[j], items[i]
    assert Key(GOLDEN_SECRET).permutation(label, n).tolist() == items


def test_labels_and_keys_give_independent_permutations() -> None:
    k1, k2 = Key(GOLDEN_SECRET), Key(bytes(reversed(GOLDEN_SECRET)))
    a = k1.permutation("ppvit/v1/a", 768)
    assert not np.array_equal(a, k1.permutation("ppvit/v1/b", 768))
    assert not np.array_equal(a, k2.permutation("ppvit/v1/a", 768))
    assert k1.fingerprint != k2.fingerprint


def test_choices_are_roughly_uniform() -> None:
    c = Key(GOLDEN_SECRET).choices("ppvit/v1/c", 8000, 8)
    counts = np.bincount(c, minlength=8)
    assert counts.min() > 850 and counts.max() < 1150  # expected 1000 each, sd ~30


def test_generate_uses_fresh_secrets() -> None:
    assert Key.generate().secret != Key.generate().secret


def test_repr_hides_secret() -> None:
    key = Key(GOLDEN_SECRET)
    assert_no_key_material([repr(key), str(key), f"{key}"], key)
    assert key.fingerprint in repr(key)


def test_save_load_round_trip_mode_0600(tmp_path: Path) -> None:
    key = Key.generate()
    path = tmp_path / "k.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Key.load(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary left behind


def test_save_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("precious")
    with pytest.raises(KeyFileError, match="already exists"):
        Key.generate().save(path)
    assert path.read_text() == "precious"


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path, 0o600)
    return path


def _valid_doc(key: Key) -> dict:
    return {"format": "ppvit-key", "version": 1, "fingerprint": key.fingerprint, "secret": key.secret.hex()}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, d: p, "not found"),
        (lambda p, d: _write(p, json.dumps(d)[:40]), "truncated or not JSON"),
        (lambda p, d: _write(p, json.dumps({**d, "version": 2})), "version 2 is not supported"),
        (lambda p, d: _write(p, "hello world"), "not a ppvit key file"),
        (lambda p, d: _write(p, json.dumps({"format": "other"})), "not a ppvit key file"),
        (lambda p, d: _write(p, json.dumps({**d, "secret": d["secret"][:40]})), "damaged"),
        (lambda p, d: _write(p, json.dumps({**d, "secret": "ab" * 31 + "cd"})), "fingerprint does not match"),
        (lambda p, d: _write(p, json.dumps(d), 0o644), "readable by other users"),
        # hostile tester: a FIFO was waited on forever, /dev/zero read until a MemoryError, deep nesting a
        # RecursionError's traceback, a 5000-digit number a line naming no file, a megabyte of spaces accepted
        (lambda p, d: _fifo(p), r"cannot be read \(not a regular file"),
        (lambda p, d: p.symlink_to("/dev/zero") or p, r"cannot be read \(not a regular file"),
        (lambda p, d: _write(p, "[" * 60_000), "truncated or not JSON"),
        (lambda p, d: _write(p, '{"format": "ppvit-key", "version": 1' + "0" * 5000 + "}"), "truncated or not JSON"),
        (lambda p, d: _write(p, json.dumps(d) + " " * 1_000_000), "over the 65,536 a key file may be"),
    ],
    ids=[
        *["missing", "truncated", "version", "not-json", "not-key", "short-secret", "tampered", "world-readable"],
        *["fifo", "dev-zero", "deep", "5000-digits", "a-megabyte"],
    ],
)
def test_bad_key_files(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / "k.key", _valid_doc(Key(GOLDEN_SECRET)))
    with pytest.raises(KeyFileError, match=message) as info:
        within_a_minute(path, lambda: Key.load(path))
    assert str(path) in str(info.value)
    assert_no_key_material(str(info.value), Key(GOLDEN_SECRET))


# -- the tests' key-material scan (conftest.assert_no_key_material) catches what it claims -----------------------

SCAN_KEY = Key(bytes(range(224, 256)))  # a secret whose seven encodings all differ (hex letters, base64 + and /)


def test_scan_key_encodings_are_distinct() -> None:
    forms = key_encodings(SCAN_KEY)
    assert len(set(forms.values())) == len(forms) == 7
    assert forms["lowercase hex"].decode() == SCAN_KEY.secret.hex() and forms["raw bytes"] == SCAN_KEY.secret


@pytest.mark.parametrize("form", list(key_encodings(SCAN_KEY)))
def test_scan_finds_each_encoding_in_files_and_texts(tmp_path: Path, form: str) -> None:
    secret = key_encodings(SCAN_KEY)[form]
    out = tmp_path / "out"
    (out / "deep" / "er").mkdir(parents=True)
    (out / "clean.json").write_text(json.dumps({"fingerprint": SCAN_KEY.fingerprint}))
    assert_no_key_material(out, SCAN_KEY)  # the fingerprint is no key material
    leak = out / "deep" / "er" / "leak.bin"
    leak.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" + secret + b"\n\x00 trailing")
    expected = f"the key's secret \\({re.escape(form)}\\) is in {re.escape(str(leak))}"
    with pytest.raises(AssertionError, match=expected):
        assert_no_key_material(out, SCAN_KEY)  # in a folder, recursively
    with pytest.raises(AssertionError, match=expected):
        assert_no_key_material([tmp_path / "out" / "clean.json", leak], SCAN_KEY)  # among files
    text = "ok: " + secret.decode("latin-1") + " (printed)"
    with pytest.raises(AssertionError, match=f"secret \\({re.escape(form)}\\) is in a text"):
        assert_no_key_material(["nothing here", text], SCAN_KEY)
    with pytest.raises(AssertionError, match=f"secret \\({re.escape(form)}\\) is in bytes"):
        assert_no_key_material(b"stderr: " + secret, SCAN_KEY)
    assert_no_key_material([out, text], Key(bytes(range(32))))  # another key's material is not this key's


def test_scan_finds_a_key_file_unless_told_to_skip_it_and_never_passes_vacuously(tmp_path: Path) -> None:
    SCAN_KEY.save(tmp_path / "k.key")
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(AssertionError, match=r"\(lowercase hex\) is in .*k\.key"):
        assert_no_key_material(tmp_path, SCAN_KEY)
    assert_no_key_material(tmp_path, SCAN_KEY, skip=[tmp_path / "k.key"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="no files to scan"):
        assert_no_key_material(tmp_path / "empty", SCAN_KEY)
    with pytest.raises(AssertionError, match="nothing there to scan"):
        assert_no_key_material(tmp_path / "missing", SCAN_KEY)
