"""`ppvit audit --ciphertext-only` on what a user uploaded: ciphertexts attacked as they are, with no key.

Real photographs (scikit-image's samples, cropped to mixed sizes), encrypted by `ppvit encrypt`; the
audit reads the encrypted folder (PNG or WebDataset shards), recovers the key's plan, decrypts
held-out ciphertexts with it and writes them. The test holds the key and checks the recovered
images against the true decryption, pixel for pixel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from attack_images import smooth_images
from conftest import KEY, assert_no_key_material
from PIL import Image

from ppvit import cli
from ppvit.attacks.audit import AuditConfig, run_audit
from ppvit.attacks.ciphertext_only_audit import CiphertextOnlyConfig, ciphertext_only_audit, score_recovery, verdict
from ppvit.attacks.metrics import roughness
from ppvit.attacks.orientation import image_symmetry_index, then
from ppvit.attacks.uploaded_audit import UploadedConfig, audit_uploaded
from ppvit.crypto.ciphers import BlockCipher, compile_plan
from ppvit.crypto.keys import Key
from ppvit.data.sources import open_source

SIZE, BLOCK, N, HELD = 64, 8, 6, 4  # shuffle at 64x64 with 8x8 blocks: 6 real photos give the key away


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """my-photos/<class>/<i>.png: crops of four sample photographs, 12 images of 9 distinct sizes."""
    from skimage import data

    root = tmp_path_factory.mktemp("my-photos")
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo = getattr(data, name)()
        (root / name).mkdir()
        h, w = photo.shape[:2]
        for i in range(3):
            side = int(rng.uniform(0.35, 0.9) * min(h, w))
            width = min(w, int(side * rng.uniform(0.8, 1.3)))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - width + 1)
            Image.fromarray(photo[y : y + side, x : x + width]).save(root / name / f"{i}.png")
    sizes = {Image.open(p).size for p in root.rglob("*.png")}
    assert len(sizes) >= 9  # mixed sizes: encrypt resizes them
    return root


@pytest.fixture(scope="module")
def key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "my.key"
    KEY.save(path)  # a fixed key: the attack's result is the same on every run
    return path


def encrypted(photos: Path, key_path: Path, dst: Path, scheme: str = "shuffle", fmt: str = "png") -> Path:
    args = ["-q", "encrypt", str(photos), str(dst), "--key", str(key_path), "--size", str(SIZE)]
    assert cli.main([*args, "--block-size", str(BLOCK), "--scheme", scheme, "--format", fmt]) == 0
    return dst


def stored_ciphertext(enc: Path, rel: str, fmt: str) -> np.ndarray:
    """The ciphertext at ``rel`` read straight from the encrypted folder (not through the audit's reader)."""
    if fmt == "png":
        return np.asarray(Image.open(enc / rel).convert("RGB"))
    import tarfile

    for shard in sorted(enc.rglob("shard-*.tar")):
        split = shard.parent.relative_to(enc).as_posix()  # "." when the source had no splits
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if os.path.normpath(f"{split}/{member.name}") == rel:
                    return np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
    raise AssertionError(f"{rel} is not in {enc}")


def recovered_images(out: Path) -> dict[str, np.ndarray]:
    folder = out / "recovered"
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def true_plain(enc: Path, rel: str, fmt: str, scheme: str = "shuffle") -> np.ndarray:
    return BlockCipher(KEY, scheme, BLOCK).decrypt(stored_ciphertext(enc, rel, fmt)[None])[0]


def test_the_uploaded_folder_is_attacked_as_it_is_without_a_key(
    tmp_path: Path,
    photos: Path,
    key_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audit took an encrypted folder for plain images and encrypted it again under a fresh key
    (false reassurance); it must recover the key that encrypted it, from the ciphertexts alone."""
    enc = encrypted(photos, key_path, tmp_path / "my-photos-enc")
    capsys.readouterr()
    out = tmp_path / "audit"
    args = ["audit", "--ciphertext-only", str(N), "--data", str(enc), "--images", str(HELD), "--out", str(out)]
    with caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    assert report["attacked"] == "stored"
    assert (report["scheme"], report["block_size"], report["size"]) == ("shuffle", BLOCK, SIZE)  # from the manifest
    assert report["key_fingerprint"] == KEY.fingerprint and report["key_given"] is False
    assert report["ciphertexts"] == 12 and report["unresolved"] == []  # shuffle: blocks in place, nothing left open
    (run,) = report["runs"]
    assert run["n"] == N and "exact" not in run  # no key: no claim about the key
    recovered = recovered_images(out)
    assert len(recovered) == HELD
    for rel, image in recovered.items():  # the held-out ciphertexts, decrypted with the recovered plan
        np.testing.assert_array_equal(image, true_plain(enc, rel, "png"), err_msg=rel)
    # the readability proxy, against independent arithmetic on the images written
    rough = np.mean([roughness(im[None]) for im in recovered.values()])
    assert run["roughness"] == pytest.approx(rough)
    assert run["roughness"] < 0.5 * min(report["random_plan_roughness"])
    said = [r.getMessage() for r in caplog.records if "ciphertexts as stored" in r.getMessage()]
    assert len(said) == 1 and str(enc) in said[0]  # the one log line saying what is attacked
    assert "smoother than every random plan" in printed.out and "recovered/" in printed.out
    assert (out / "ciphertext-only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_no_key_material([out, printed.out, printed.err, caplog.text], KEY)


def test_with_the_key_the_recovery_is_reported_exact_on_webdataset_shards(
    tmp_path: Path, photos: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """WebDataset shards (as a server stores them): with --key, the recovered plan is compared with the true one."""
    enc = encrypted(photos, key_path, tmp_path / "enc-wds", fmt="wds")
    capsys.readouterr()
    out = tmp_path / "audit"
    args = ["audit", "--ciphertext-only", str(N), "--data", str(enc), "--images", str(HELD), "--out", str(out)]
    assert cli.main([*args, "--key", str(key_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    (run,) = report["runs"]
    assert report["key_given"] is True
    assert (run["exact"], run["verdict"], run["psnr_db"], run["ssim"]) == (1.0, "exact", "inf", 1.0)
    assert run["true_roughness"] == pytest.approx(run["roughness"])
    for rel, image in recovered_images(out).items():
        np.testing.assert_array_equal(image, true_plain(enc, rel, "wds"), err_msg=rel)
    assert f"N={N}: exact" in printed


def test_wrong_key_and_settings_that_contradict_the_manifest_are_refused(
    tmp_path: Path, photos: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc = encrypted(photos, key_path, tmp_path / "enc")
    other = tmp_path / "other.key"
    Key(bytes([7]) * 32).save(other)
    base = ["audit", "--ciphertext-only", "2", "--data", str(enc), "--out", str(tmp_path / "out")]
    for extra, said in (
        (["--key", str(other)], f"key {Key(bytes([7]) * 32).fingerprint} did not encrypt"),
        (["--scheme", "shuffle+scramble"], "scheme is shuffle"),
        (["--block-size", "16"], "block size is 8"),
        (["--keys", "3"], "--keys"),
        (["--splits", "test=astronaut"], "--splits is for the source it was encrypted from"),  # it was ignored
    ):
        capsys.readouterr()
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err and str(enc) in err, (extra, err)
    # the full audit needs plain images: ciphertext is never taken for them
    assert cli.main(["audit", "--data", str(enc), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ciphertext-only" in err and str(enc) in err
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_another_keys_ciphertexts_is_refused_naming_the_first(
    tmp_path: Path, photos: Path, key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """astronaut/ copied in from another key's encrypted folder (each PNG marked with that key's fingerprint):
    the audit attacked and scored every file as this key's (exit 0); decrypt and predict refuse such files."""
    enc = encrypted(photos, key_path, tmp_path / "enc")
    other = Key(bytes([7]) * 32)
    other.save(tmp_path / "other.key")
    shutil.rmtree(enc / "astronaut")
    shutil.copytree(encrypted(photos, tmp_path / "other.key", tmp_path / "enc2") / "astronaut", enc / "astronaut")
    capsys.readouterr()
    args = ["audit", "--ciphertext-only", "8", "--data", str(enc), "--images", "4", "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--key", str(key_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{enc}: astronaut/0.png: ciphertext of another dataset" in err, err
    assert f"key fingerprint is {other.fingerprint}, not {KEY.fingerprint}" in err, err
    assert_no_key_material([err], KEY)
    assert_no_key_material([err], other)
    assert not (tmp_path / "out").exists()


def _uploaded(enc: Path, out: Path) -> None:
    audit_uploaded(open_source(enc), [N], UploadedConfig(images=HELD), out=out)


def _simulated(enc: Path, out: Path) -> None:
    cfg = CiphertextOnlyConfig(size=SIZE, block_size=BLOCK, images=HELD)
    ciphertext_only_audit(smooth_images(N + HELD, SIZE, seed=0), ["shuffle"], [N], [KEY], cfg, out)


def _full(enc: Path, out: Path) -> None:
    cfg = AuditConfig(schemes=("shuffle",), size=SIZE, block_size=BLOCK, pairs=(1,), images=HELD)
    run_audit(KEY, smooth_images(N + HELD, SIZE, seed=0), cfg, out)


@pytest.mark.parametrize(
    ("entry", "out", "said"),
    [
        (_uploaded, "myproj", "holds other files and no audit.json"),
        (_uploaded, "enc/audit", "overlaps --data"),
        (_simulated, "myproj", "holds other files and no audit.json"),
        (_full, "myproj", "holds other files and no audit.json"),
    ],
    ids=["stored, other files", "stored, inside the data", "simulated", "full audit"],
)
def test_the_library_audits_never_delete_or_replace_files_they_did_not_write(
    tmp_path: Path, photos: Path, key_path: Path, entry: Callable[[Path, Path], None], out: str, said: str
) -> None:
    """audit_uploaded(out=myproj) deleted myproj/recovered/holiday/beach.png (write_recovered removes every PNG
    there) and each audit replaced a user's audit.json: only the CLI refused such an --out."""
    enc = encrypted(photos, key_path, tmp_path / "enc")
    photo = tmp_path / "myproj" / "recovered" / "holiday" / "beach.png"
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photo)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=said):
        entry(enc, tmp_path / out)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_mirror_is_reported_as_readable_and_mirrored() -> None:
    """What "up to a symmetry" costs the user is said in words: a mirrored image is fully readable."""
    shape, p = (16, 16, 3), 4
    truth = compile_plan(KEY, "shuffle+scramble", p, shape)
    held = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
    assert verdict(score_recovery(truth, truth, "shuffle+scramble", p, held), p) == "exact"
    mirrored = then(truth, image_symmetry_index(shape, 4))
    said = verdict(score_recovery(mirrored, truth, "shuffle+scramble", p, held), p)
    assert said.startswith("up to image flip") and "mirrored" in said and "readable" in said
    swapped = compile_plan(Key(bytes([9]) * 32), "shuffle+scramble", p, shape)
    assert verdict(score_recovery(swapped, truth, "shuffle+scramble", p, held), p).startswith("not recovered")


def test_scrambled_blocks_come_back_up_to_the_mirror_the_report_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shuffle+scramble`: no ciphertext shows left from right, so the recovered images are the originals or
    their mirror images; the report says so without the key, and with it says which and what it costs."""
    secret = Key(bytes([1]) * 32)
    src = tmp_path / "photos" / "test" / "field"
    src.mkdir(parents=True)
    for i, image in enumerate(smooth_images(20, SIZE, seed=11)):
        Image.fromarray(image).save(src / f"{i:02d}.png")
    secret.save(tmp_path / "k.key")
    enc = tmp_path / "enc"
    args = ["-q", "encrypt", str(tmp_path / "photos"), str(enc), "--key", str(tmp_path / "k.key")]
    assert cli.main([*args, "--block-size", str(BLOCK), "--scheme", "shuffle+scramble"]) == 0
    out = tmp_path / "audit"
    args = ["audit", "--ciphertext-only", "16", "--data", str(enc), "--images", "2", "--out", str(out)]
    assert cli.main([*args, "--key", str(tmp_path / "k.key")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    assert report["unresolved"] == ["image flip"] and "mirror image, as readable" in printed
    (run,) = report["runs"]
    assert run["verdict"].startswith("up to image flip: readable (mirrored)") and run["exact"] < 0.1
    assert "N=16: up to image flip: readable (mirrored)" in printed
    cipher = BlockCipher(secret, "shuffle+scramble", BLOCK)
    for rel, image in recovered_images(out).items():
        plain = cipher.decrypt(np.asarray(Image.open(enc / rel).convert("RGB"))[None])[0]
        np.testing.assert_array_equal(image, plain[:, ::-1], err_msg=rel)  # the mirror image, exactly
