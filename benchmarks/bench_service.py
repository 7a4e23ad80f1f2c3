"""Fine-tuning as a service against doing it by hand, on one machine.

1. ``ppvit train`` run directly on the encrypted shards (a process, wall time), then the same
   settings as a service job (from its submission to its end, from the server's record): the ratio
   (target <= 1.05).
2. Upload throughput (``Client.upload``: hash, declare, send, server-side hash and rename)
   against a plain copy of the same shard files (``shutil.copytree``), MB/s.
3. ``ppvit client train ... --activate`` from its start (encrypt, upload, job, follow) to the
   first served prediction, seconds.

The server is a ``ppvit serve`` process on 127.0.0.1 with training on; the tenant starts with
the direct run's adapter. ``--quick``: the micro ViT on 32 px synthetic images (a smoke run).

Usage:
    python benchmarks/bench_service.py [--data DIR] [--weights $PPVIT_WEIGHTS] [--epochs 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.models.weights import WEIGHTS_ENV
from ppvit.serve.client import Client
from ppvit.serve.tenants import TenantStore

PPVIT = [sys.executable, "-m", "ppvit.cli"]


def synthetic(root: Path, per_class: int, size: int) -> Path:
    """train/ and test/ ImageFolders of 4 colour classes (stands in for --data)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(1, per_class // 4))):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] = 200
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="plain ImageFolder with train/ and test/ (default: synthetic images)")
    p.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help="base weights (default $PPVIT_WEIGHTS)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="micro ViT, 32 px synthetic images, no weights file")
    p.add_argument("--train-device", default="cpu", help="the server's job slot (serve --train-devices), e.g. cuda:0")
    args = p.parse_args()
    if args.quick:
        args.model, args.size, args.block_size, args.batch_size = "vit_micro_d2_patch4_32", 32, 4, 16
        args.weights = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    data = Path(args.data) if args.data else synthetic(tmp / "plain", 64 if args.quick else 500, args.size)
    key = tmp / "client.key"
    Key.generate().save(key)
    shards = tmp / "shards"
    encrypt_collection(data, shards, BlockCipher(Key.load(key), "shuffle", args.block_size), args.size, "wds")
    settings = {"method": "lora-pe", "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    weights = ["--weights", args.weights] if args.weights else []
    weights += [f"--img-size={args.size}"]  # the direct run's input size (a job takes it from the manifest)

    t0 = time.perf_counter()
    subprocess.run([*PPVIT, "-q", "train", "--data", str(shards), "--out", str(tmp / "direct"), *flags, *weights,
                    "--quiet"], check=True)  # fmt: skip
    direct = time.perf_counter() - t0

    root = tmp / "srv"
    token = TenantStore(root).add("bench", tmp / "direct", args.weights)
    (tmp / "bench.token").write_text(token)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model_spec = f"{args.model}={args.weights}" if args.weights else args.model
    server = subprocess.Popen(
        [
            *PPVIT,
            "-q",
            "serve",
            "--root",
            str(root),
            "--port",
            str(port),
            "--train-model",
            model_spec,
            "--train-devices",
            args.train_device,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url, server)
        nbytes = sum(f.stat().st_size for f in shards.rglob("*.tar"))
        t0 = time.perf_counter()
        shutil.copytree(shards, tmp / "copied")
        copy_s = time.perf_counter() - t0
        with Client(url, token, timeout=600) as c:
            t0 = time.perf_counter()
            c.upload(shards, "uploaded")
            upload_s = time.perf_counter() - t0
            job = c.follow(c.submit("uploaded", settings)["id"], interval=0.2)
            service = job["ended"] - job["created"]  # from submission: pick-up and process start included
            runs = {"direct": tmp / "direct", "service": root / "jobs" / job["id"] / "run"}
            results = {name: json.loads((run / "result.json").read_text()) for name, run in runs.items()}

            t0 = time.perf_counter()
            cmd = [*PPVIT, "client", "train", str(data), "--key", str(key), "--name", "e2e"]
            cmd += ["--work", str(tmp / "work"), "--server", url, "--token-file", str(tmp / "bench.token")]
            cmd += ["--img-size", str(args.size), "--block-size", str(args.block_size), "--model", args.model]
            cmd += ["--epochs", str(args.epochs), "--set", f"batch_size={args.batch_size}", "--activate"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first = next(iter(sorted((data / "test").rglob("*.png"))))
            c.predict([first], Key.load(key))
            e2e = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(60)
    mb = nbytes / 1e6
    print(f"{args.model} at {args.size} px, {args.epochs} epoch(s), {mb:.1f} MB of shards")
    print(f"job: direct ppvit train {direct:.1f} s, through the service {service:.1f} s, ratio {service / direct:.3f}")
    for name, r in results.items():  # the training itself, without process start and data loading
        print(f"  {name}: train {r['train_seconds']:.1f} s, {r['images_per_s']:.0f} img/s, {r['precision']}")
    print(f"upload: {mb / upload_s:.1f} MB/s (plain copy {mb / copy_s:.1f} MB/s)")
    print(f"client train -> first served prediction: {e2e:.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
