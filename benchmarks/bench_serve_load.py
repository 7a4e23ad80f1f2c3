"""Load on ``ppvit serve`` with a real load tool (locust, headless): throughput and latency per tenant mix.

A ``ppvit serve`` process on 127.0.0.1 with random lora-pe tenants (``bench_serve.register_tenants``),
then locust runs, one after another, each for ``--seconds``:

1. ``--clients`` users on 1 tenant, then on 16 tenants, one image a request: requests/s, p50, p99;
2. the victim alone: 2 users of one tenant, one image a request (its quiet p99);
3. the victim beside a noisy neighbour: the same 2 users while ``--noisy-users`` users of another
   tenant send ``--noisy-images`` images a request. The server's per-tenant cap is set above the
   users, so fairness here is the batcher's turn-taking alone. The victim's noisy/quiet p99 ratio
   is measured in this one run (target: at most 2);
4. the victim beside a tenant of long labels: the same 2 users while ``--label-users`` users of a
   tenant whose head has as many classes with names as long as the registry takes (``--label-classes``
   names of ``MAX_CLASS_NAME`` characters, ``MAX_CLASS_BYTES`` together: its ``GET /v1/adapter``
   answers about half a MB, sent without ``If-None-Match``; a prediction names the server's default
   top-k classes) alternate that and one-image predictions (issue 31: a 10 MB label once tripled a
   neighbour's p99; target: at most 2).

Usage (on a quiet machine; ``--quick`` is a smoke run of the micro ViT at 32 px, about a minute):
    python benchmarks/bench_serve_load.py [--weights $PPVIT_WEIGHTS] [--size 112] [--seconds 20]
    python benchmarks/bench_serve_load.py --quick
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from bench_serve import MODEL, register_tenants

from ppvit.models.weights import WEIGHTS_ENV
from ppvit.serve.defaults import MAX_CLASS_BYTES, MAX_CLASS_NAME

HERE = Path(__file__).resolve().parent
QUICK_MODEL = "vit_micro_d2_patch4_32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npy_body(path: Path, images: int, size: int, seed: int) -> str:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 256, (images, size, size, 3), dtype=np.uint8))
    path.write_bytes(buf.getvalue())
    return str(path)


def start_server(
    root: Path, port: int, window_ms: float, tenant_requests: int, shared_ms: float, *flags: str
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ppvit.cli", "-q", "serve", "--root", str(root), "--port", str(port)]
    cmd += ["--window-ms", str(window_ms), "--tenant-requests", str(tenant_requests)]
    cmd += ["--shared-pass-ms", str(shared_ms), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped: {proc.stderr.read().decode()[-500:]}")
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start within 120 s")
        time.sleep(0.2)


def run_locust(url: str, config: dict, work: Path, name: str, seconds: float) -> dict[str, dict[str, float]]:
    """One headless locust run; per role: requests/s, p50 and p99 in ms, failures."""
    (work / f"{name}.json").write_text(json.dumps(config))
    users = sum(config["users"].values())
    classes = {"tenant": "TenantUser", "victim": "VictimUser", "noisy": "NoisyUser", "labels": "LabelsUser"}
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locust_serve.py"), "--headless", "--only-summary"]
    cmd += ["--exit-code-on-error", "0"]  # failures are reported in the table
    cmd += ["-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--host", url, "--csv", str(work / name)]
    cmd += [classes[role] for role, n in config["users"].items() if n]
    env = {**os.environ, "PPVIT_LOAD_CONFIG": str(work / f"{name}.json")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode:
        raise SystemExit(f"locust failed ({done.returncode}): {done.stderr[-1000:]}")
    out = {}
    with open(work / f"{name}_stats.csv") as fh:
        for row in csv.DictReader(fh):
            if row["Name"] in classes:
                out[row["Name"]] = {
                    "rps": float(row["Requests/s"]),
                    "p50": float(row["50%"]),
                    "p99": float(row["99%"]),
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: the micro ViT at 32 px, 4 s a scenario")
    ap.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help="ViT-Ti/16 weights ($PPVIT_WEIGHTS)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--noisy-users", type=int, default=8)
    ap.add_argument("--noisy-images", type=int, default=24)
    ap.add_argument("--label-users", type=int, default=8, help="users of the long-labels tenant (run 4)")
    ap.add_argument(
        "--label-classes",
        type=int,
        default=MAX_CLASS_BYTES // MAX_CLASS_NAME,
        help=f"its classes, each named by {MAX_CLASS_NAME} characters (default: as many as the registry takes)",
    )
    ap.add_argument("--window-ms", type=float, default=5)
    ap.add_argument("--shared-pass-ms", type=float, default=20, help="the server's --shared-pass-ms")
    args = ap.parse_args()
    model, weights, size, seconds = MODEL, args.weights, args.size, args.seconds
    if args.quick:
        model, weights, size, seconds = QUICK_MODEL, None, 32, 4
    work = Path(tempfile.mkdtemp(prefix="bench-serve-load-"))
    tokens = register_tenants(work, 16, weights, size, model)
    victim, noisy = (register_tenants(work, 1, weights, size, model, prefix=p)[0] for p in ("victim", "noisy"))
    (labels,) = register_tenants(work, 1, weights, size, model, "labels", args.label_classes, MAX_CLASS_NAME)
    one = npy_body(work / "one.npy", 1, size, 0)
    many = npy_body(work / "many.npy", args.noisy_images, size, 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # every user may have a request in flight: the runs measure scheduling, not the per-tenant cap's 429s
    most_users = max(args.clients, args.noisy_users, args.label_users)
    server = start_server(work / "root", port, args.window_ms, most_users, args.shared_pass_ms)
    try:
        for token in [*tokens, victim, noisy, labels]:  # every adapter loaded before anything is timed
            httpx.post(f"{url}/v1/predict", content=Path(one).read_bytes(), timeout=120,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"})  # fmt: skip
        bodies = {"tenant": one, "victim": one, "noisy": many, "labels": one}
        runs = {
            "1 tenant": {"tokens": {"tenant": tokens[:1]}, "users": {"tenant": args.clients}},
            "16 tenants": {"tokens": {"tenant": tokens}, "users": {"tenant": args.clients}},
            "victim alone": {"tokens": {"victim": [victim]}, "users": {"victim": 2}},
            "victim + noisy": {
                "tokens": {"victim": [victim], "noisy": [noisy]},
                "users": {"victim": 2, "noisy": args.noisy_users},
            },
            "victim + long labels": {
                "tokens": {"victim": [victim], "labels": [labels]},
                "users": {"victim": 2, "labels": args.label_users},
            },
        }
        results = {}
        for i, (name, cfg) in enumerate(runs.items()):
            results[name] = run_locust(url, {**cfg, "bodies": bodies}, work, f"run{i}", seconds)
    finally:
        server.terminate()
        server.wait(60)
    print(
        f"\n## ppvit serve under locust: {model} at {size} px, window {args.window_ms} ms, "
        f"shared pass {args.shared_pass_ms} ms, {seconds:g} s a run"
    )
    print("| run | role | users | requests/s | p50 ms | p99 ms | requests | failures |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg in runs.items():
        for role, r in results[name].items():
            print(
                f"| {name} | {role} | {cfg['users'][role]} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                f"{r['requests']} | {r['failures']} |"
            )
    quiet = results["victim alone"]["victim"]["p99"]
    for name in ("victim + noisy", "victim + long labels"):
        loud = results[name]["victim"]["p99"]
        ratio = f"{loud:.0f} / {quiet:.0f} ms = {loud / quiet:.2f}"
        print(f"\nvictim p99 {name.removeprefix('victim ')} / alone: {ratio} (target <= 2)")


if __name__ == "__main__":
    main()
