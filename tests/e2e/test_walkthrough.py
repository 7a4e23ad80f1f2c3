"""A newcomer's second hour, through the real CLI, on photos of mixed sizes (issue 29):

    encrypt -> audit the ciphertexts -> train -> predict -> serve -> client predict -> client train -> activate

The photos are scikit-image's sample photos, cropped at random places to random sizes (no two
alike), in two classes; the model is ppvit's micro ViT at 32 px, so the whole walk takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import SMALL, free_port
from PIL import Image
from safetensors.torch import save_file

from ppvit import cli
from ppvit.models.backbones import create_backbone
from ppvit.serve.tenants import TenantStore

pytest.importorskip("fastapi")
skimage_data = pytest.importorskip("skimage.data")

PHOTOS = {"cat": ("chelsea", "cat", "coffee"), "space": ("astronaut", "rocket", "hubble_deep_field")}
TRAIN, TEST = 12, 4  # crops a class


def photos(root: Path) -> list[tuple[int, int]]:
    """train/ and test/ crops of each class's photos, of random sizes (24-96 px a side); their sizes."""
    rng = np.random.default_rng(29)
    sizes = []
    for cls, names in PHOTOS.items():
        sources = [getattr(skimage_data, n)() for n in names]
        for split, n in (("train", TRAIN), ("test", TEST)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = sources[i % len(sources)]
                h, w = (int(v) for v in rng.integers(24, 97, 2))
                y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
                Image.fromarray(img[y : y + h, x : x + w]).save(root / split / cls / f"{i:02d}.png")
                sizes.append((w, h))
    return sizes


def ppvit(*argv: object, capsys: pytest.CaptureFixture[str], code: int = 0) -> str:
    """Run `ppvit ARGV` in this process; its standard output (the exit status checked)."""
    capsys.readouterr()
    got = cli.main([str(a) for a in argv])
    printed = capsys.readouterr()
    assert got == code, printed.err[-3000:]
    return printed.out


def start_server(root: Path, weights: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ppvit.cli", "serve", "--root", str(root), "--port", str(port)]
    cmd += ["--train-model", f"{SMALL}={weights}"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def test_encrypt_train_predict_serve_and_train_on_the_server(tmp_path: Path, capsys) -> None:
    sizes = photos(tmp_path / "photos")
    assert len(set(sizes)) == len(sizes)  # mixed sizes, every one different
    key, enc, run = tmp_path / "my.key", tmp_path / "photos-enc", tmp_path / "run"
    ppvit("keygen", key, capsys=capsys)

    # encrypt: mixed sizes resized to the model's 32 px, 4-pixel blocks (the micro ViT's patches)
    ppvit("-q", "encrypt", tmp_path / "photos", enc, "--key", key, "--size", 32, "--block-size", 4, capsys=capsys)
    assert len(list(enc.rglob("*.png"))) == 2 * (TRAIN + TEST)

    # audit what would be uploaded: the ciphertexts as they are (no key), then with the key to compare
    audit = tmp_path / "audit"
    ppvit("-q", "audit", "--ciphertext-only", 24, "--data", enc, "--images", 4, "--out", audit, capsys=capsys)
    (unkeyed,) = json.loads((audit / "audit.json").read_text())["ciphertext_only"]["runs"]
    out = ppvit(
        "-q", "audit", "--ciphertext-only", 24, "--data", enc, "--images", 4, "--key", key, "--out", audit,
        capsys=capsys,
    )  # fmt: skip
    report = json.loads((audit / "audit.json").read_text())["ciphertext_only"]
    (keyed,) = report["runs"]
    assert report["attacked"] == "stored" and (keyed["verdict"], keyed["psnr_db"]) == ("exact", "inf"), out
    assert unkeyed["roughness"] == pytest.approx(keyed["true_roughness"])  # without the key: the plain images

    # train on the ciphertexts alone (no key), from a base weights file the server will offer too
    weights = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone(SMALL, num_classes=2).state_dict(), str(weights))
    settings = ["--model", SMALL, "--weights", weights, "--scheme", "shuffle", "--block-size", 4]
    settings += ["--epochs", 2, "--batch-size", 8, "--lr", 3e-3, "--val-fraction", 0.25, "--precision", "no"]
    result = json.loads(ppvit("-q", "train", "--data", enc, "--out", run, *settings, capsys=capsys))
    assert result["test_images"] == 2 * TEST and result["epochs"] == 2
    assert json.loads((run / "result.json").read_text()) == result

    # predict the plain test photos (resized and encrypted here): their accuracy is the run's test accuracy
    test_files = sorted((tmp_path / "photos" / "test").rglob("*.png"))
    lines = ppvit("-q", "predict", run, tmp_path / "photos" / "test", "--key", key, capsys=capsys).splitlines()
    predicted = {Path(f): cls for f, cls, _ in (line.split("\t") for line in lines)}
    assert sorted(predicted) == test_files
    assert sum(predicted[f] == f.parent.name for f in test_files) / len(test_files) == result["test_acc"]

    # serve it: the server's answers are the local predictions
    root = tmp_path / "root"
    token = tmp_path / "me.token"
    token.write_text(TenantStore(root).add("me", run, weights))
    proc, url = start_server(root, weights, tmp_path / "server.log")
    try:
        connection = ["--server", url, "--token-file", token]
        lines = ppvit("-q", "client", "predict", *test_files, "--key", key, *connection, capsys=capsys).splitlines()
        assert {Path(line.split("\t")[0]): line.split("\t")[1] for line in lines} == predicted

        # train on the server: no --model (it offers one), not activated: version 1 stays served
        job_settings = ["--set=batch_size=8", "--set=lr=3e-3", "--set=val_fraction=0.25", "--set=precision=no"]
        out = ppvit(
            "-q", "client", "train", tmp_path / "photos", "--key", key, "--work", tmp_path / "photos.wds",
            "--img-size", 32, "--block-size", 4, "--epochs", 1, *job_settings, *connection, capsys=capsys,
        )  # fmt: skip
        job_id = out.split("\t")[0]
        served = json.loads((root / "jobs" / job_id / "run" / "result.json").read_text())
        assert f"test accuracy {served['test_acc']:.3f} on {2 * TEST} images" in out, out
        assert "version 2 is trained but not served (version 1 still is)" in out, out
        assert f"ppvit client activate {job_id} --server {url} --token-file {token}" in out, out
        ppvit("-q", "client", "activate", job_id, *connection, capsys=capsys)
        lines = ppvit("-q", "client", "predict", *test_files[:2], "--key", key, *connection, capsys=capsys)
        assert len(lines.splitlines()) == 2
        info = httpx.get(f"{url}/v1/adapter", headers={"Authorization": f"Bearer {token.read_text().strip()}"})
        assert info.json()["version"] == 2
    finally:
        proc.terminate()
        proc.wait(60)
