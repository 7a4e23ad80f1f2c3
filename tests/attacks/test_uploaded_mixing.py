"""`ppvit audit --ciphertext-only N --data ENC --prior PLAIN` on `mix`/`lift` ciphertext, attacked as stored.

Smooth toy photographs encrypted by `ppvit encrypt --format npz`; the prior is other smooth images of
half the size (the audit resizes them). 2x2 blocks keep the attack's search to seconds (12 values a
block: groups of 8 and 4 components, where 4x4 blocks' 32 components take ~10 s per N). The test
holds the key and checks the report's numbers against arithmetic of its own on the files written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from attack_images import smooth_images
from conftest import KEY, assert_no_key_material
from PIL import Image

from ppvit import cli
from ppvit.attacks.block_mixing import thumbnail
from ppvit.attacks.metrics import roughness, ssim
from ppvit.attacks.uploaded_mixing import read_prior
from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.images import resize_array

SIZE, BLOCK, N, HELD, PRIOR = 32, 2, 20, 4, 60


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """photos/test/field/ (30 smooth 32x32 images), prior/field/ (60 others at 16x16), the key file."""
    root = tmp_path_factory.mktemp("upload")
    for name, images in (
        ("photos/test/field", smooth_images(30, SIZE, seed=11, grain=3.0)),
        ("prior/field", smooth_images(PRIOR, SIZE // 2, seed=12, grain=3.0)),
    ):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i:02d}.png")
    KEY.save(root / "my.key")
    return {"photos": root / "photos", "prior": root / "prior", "key": root / "my.key", "root": root}


def encrypted(folders: dict[str, Path], scheme: str) -> Path:
    dst = folders["root"] / f"enc-{scheme}"
    if not dst.exists():
        args = ["-q", "encrypt", str(folders["photos"]), str(dst), "--key", str(folders["key"])]
        assert cli.main([*args, "--block-size", str(BLOCK), "--scheme", scheme, "--format", "npz"]) == 0
    return dst


def stored(enc: Path) -> dict[str, np.ndarray]:
    """Every ciphertext as its shard holds it (not through the audit's reader), by its path."""
    found = {}
    for shard in enc.rglob("shard-*.npz"):
        with np.load(shard) as z:
            found.update(zip(z["paths"].tolist(), z["images"], strict=True))
    return found


def psnr_of(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_a_mixing_without_a_prior_and_a_wrong_prior_are_refused_in_one_line(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    enc = encrypted(folders, "mix")
    out = tmp_path / "out"
    base = ["audit", "--ciphertext-only", "5", "--data", str(enc), "--out", str(out)]
    for extra, said in (
        ([], "a mixing's attack needs plain public images of the same kind: --prior PLAIN"),
        (["--prior", str(enc)], f"--prior {enc}: ciphertext"),
        (["--prior", str(folders["prior"]), "--prior-images", "0"], "--prior-images: expected a positive number"),
    ):
        capsys.readouterr()
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, (extra, err)
        assert extra or (str(enc) in err and "float16" in err), err  # names the dataset and what it holds
    assert not out.exists()  # nothing written before the refusal
    shuffled = encrypted(folders, "shuffle")
    plain = ["audit", "--ciphertext-only", "5", "--data", str(folders["photos"]), "--out", str(out)]
    for args, said in (
        (["audit", "--ciphertext-only", "5", "--data", str(shuffled), "--prior", str(folders["prior"])], "mix/lift"),
        ([*plain, "--prior", str(folders["prior"])], "is plain"),
        (["audit", "--data", str(folders["photos"]), "--prior", str(folders["prior"])], "--ciphertext-only"),
    ):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--prior" in err and said in err, err
    assert not out.exists()


def test_the_prior_is_capped_and_resized_to_the_ciphertexts(tmp_path: Path, folders: dict[str, Path]) -> None:
    """At most --prior-images of them (all, when fewer), each resized to the ciphertexts' side by the one resize,
    from outside the test split where there is one."""
    capped = read_prior(folders["prior"], 25, SIZE, BLOCK)
    assert capped.images == 25 and capped.stats.count == 25 * (SIZE // BLOCK) ** 2
    whole = read_prior(folders["prior"], 2000, SIZE, BLOCK)
    assert whole.images == PRIOR and whole.data == str(folders["prior"])
    small = np.stack([np.asarray(Image.open(f)) for f in sorted((folders["prior"] / "field").glob("*.png"))])
    assert small.shape[1:3] == (SIZE // 2, SIZE // 2)
    resized = np.stack([resize_array(im, SIZE) for im in small])
    assert whole.roughness == pytest.approx(roughness(resized))
    g = SIZE // BLOCK  # the mean block (2x2x3 values in row, column, channel order) of the resized images
    blocks = resized.reshape(PRIOR, g, BLOCK, g, BLOCK, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, BLOCK * BLOCK * 3)
    np.testing.assert_allclose(whole.stats.mean, blocks.mean(0), atol=1e-9)
    split = tmp_path / "split"
    for name, value in (("train", 200), ("test", 0)):  # black test images: never read
        (split / name / "c").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(split / name / "c" / f"{i}.png")
    only_train = read_prior(split, 100, SIZE, BLOCK)
    assert only_train.images == 3 and only_train.roughness == 0.0
    assert only_train.read_from == "outside its test split (test/)"
    np.testing.assert_allclose(only_train.stats.mean, 200.0)


@pytest.mark.parametrize("scheme", ["mix", "lift"])
def test_stored_mixing_ciphertext_is_attacked_and_scored_against_the_key(
    tmp_path: Path, folders: dict[str, Path], scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report's PSNR is that of the PNGs written in recovered/ against the key's own decryption."""
    enc = encrypted(folders, scheme)
    capsys.readouterr()
    out = tmp_path / "audit"
    args = ["audit", "--ciphertext-only", str(N), "--data", str(enc), "--images", str(HELD), "--out", str(out)]
    assert cli.main([*args, "--prior", str(folders["prior"]), "--key", str(folders["key"])]) == 0
    printed = capsys.readouterr()
    co = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    assert (co["scheme"], co["mixing"], co["block_size"], co["size"]) == (scheme, scheme, BLOCK, SIZE)
    assert co["prior_images"] == PRIOR and co["key_given"] is True and co["attack_images"] == N
    assert co["prior_read_from"] == "all of it"  # the prior folder has no test split
    (run,) = co["runs"]
    assert run["n"] == N
    cipher, ciphertexts = BlockCipher(KEY, scheme, BLOCK), stored(enc)
    held = co["held_out"]
    assert len(held) == HELD
    recovered = np.stack([np.asarray(Image.open(out / "recovered" / Path(rel).with_suffix(".png"))) for rel in held])
    assert len(list((out / "recovered").rglob("*.png"))) == HELD
    truth = cipher.decrypt(np.stack([ciphertexts[rel] for rel in held]))
    assert truth.dtype == np.uint8 and ciphertexts[held[0]].dtype == np.dtype(co_dtype(scheme))
    assert run["psnr_db"] == pytest.approx(psnr_of(truth, recovered), abs=1e-9)
    assert run["ssim"] == pytest.approx(ssim(truth, recovered))
    assert run["roughness"] == pytest.approx(np.mean([roughness(im[None]) for im in recovered]))
    assert co["thumbnail_psnr_db"] == pytest.approx(psnr_of(truth, thumbnail(truth, BLOCK)))
    assert not np.array_equal(recovered, thumbnail(truth, BLOCK))  # the attack's own images, not the reference
    assert (out / "ciphertext-only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"N={N}: against the true decryption (--key) PSNR {run['psnr_db']:.1f} dB" in printed.out
    assert_no_key_material([out, printed.out, printed.err], KEY)


def co_dtype(scheme: str) -> str:
    return "float16" if scheme == "mix" else "int16"


def test_without_the_key_the_readability_proxy_is_the_priors_roughness(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """No key: no claim about the key, the decryptions' roughness beside the prior's; still no key material."""
    enc = encrypted(folders, "mix")
    capsys.readouterr()
    out = tmp_path / "audit"
    args = ["audit", "--ciphertext-only", f"5,{N}", "--data", str(enc), "--images", str(HELD), "--out", str(out)]
    assert cli.main([*args, "--prior", str(folders["prior"])]) == 0
    printed = capsys.readouterr()
    co = json.loads((out / "audit.json").read_text())["ciphertext_only"]
    assert co["key_given"] is False and "thumbnail_psnr_db" not in co
    assert [r["n"] for r in co["runs"]] == [5, N] and all("psnr_db" not in r for r in co["runs"])
    recovered = [np.asarray(Image.open(p)) for p in sorted((out / "recovered").rglob("*.png"))]
    assert len(recovered) == HELD  # the largest N's decryptions
    assert co["runs"][-1]["roughness"] == pytest.approx(np.mean([roughness(im[None]) for im in recovered]))
    said = [line for line in printed.out.splitlines() if line.startswith(f"  N={N}: decryptor")]
    assert len(said) == 1 and f"{co['prior_roughness']:.1f} in the prior" in said[0], printed.out
    assert_no_key_material([out, printed.out, printed.err], KEY)
