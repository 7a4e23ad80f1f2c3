"""What ``ppvit serve`` spends per request beside the model: server CPU per request, against its own HTTP floor.

On a GPU the model's pass is short (64 ViT-Ti/16 images at 224 in about 7 ms on an H200) and a
one-image request's Python (HTTP, auth, decoding, batching, the answer) is what bounds the rate
(BENCHMARKS.md: 148 requests/s there, as on 2 CPU cores). This measures that Python on any machine:
a ``ppvit serve`` process with ``--tenants`` lora-pe tenants of the micro ViT at 32 px (a model that
costs little), loaded by ``wrk`` (Debian's ``wrk``, a C load generator: the load costs the server's
cores little) with ``--connections`` connections, one ciphertext a request, tokens in turn; then
``GET /healthz`` with the same connections: the floor, the framework's own cost of a request. For
each: requests/s, p50/p99, the server process's CPU time (user + system, all threads, from
``/proc``) per request and its routed passes' time per request (``ppvit_pass_seconds``); then
predict's CPU beside the passes against the floor's.

Usage (a quiet machine; Linux, wrk on the PATH):
    python benchmarks/bench_serve_overhead.py [--seconds 15] [--connections 32] [--tenants 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from bench_serve import register_tenants
from bench_serve_load import QUICK_MODEL, free_port, npy_body, start_server

SIZE = 32


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lua_script(path: Path, tokens: list[str], body: str | None) -> Path:
    """A wrk script: POST ``body`` to /v1/predict with the tokens in turn (or GET /healthz when no body)."""
    if body is None:
        path.write_text('wrk.method = "GET"\nwrk.path = "/healthz"\n')
        return path
    path.write_text(
        f"local tokens = {{{', '.join(json.dumps(t) for t in tokens)}}}\n"
        f'local f = io.open({json.dumps(body)}, "rb"); local body = f:read("*all"); f:close()\n'
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  local headers = {["Authorization"] = "Bearer " .. tokens[i % #tokens + 1],'
        ' ["Content-Type"] = "application/x-npy"}\n'
        '  return wrk.format("POST", "/v1/predict", headers, body)\n'
        "end\n"
    )
    return path


def pass_seconds(url: str) -> float:
    """The server's routed passes' seconds so far (its ``/metrics``); NaN from a ppvit without that metric (an
    older checkout's ``src`` on PYTHONPATH, for a comparison)."""
    found = re.search(r"^ppvit_pass_seconds_sum ([\d.e+-]+)$", httpx.get(f"{url}/metrics", timeout=30).text, re.M)
    return float(found.group(1)) if found else math.nan


def wrk(url: str, script: Path, connections: int, seconds: float, pid: int) -> dict[str, float]:
    """One wrk run: requests/s, p50/p99 ms, non-2xx answers, the server's CPU ms per request and its
    passes' ms per request (wall time of the forward thread: on a CPU, CPU time too)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url]
    cpu0, pass0 = cpu_seconds(pid), pass_seconds(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    cpu, passes = cpu_seconds(pid) - cpu0, pass_seconds(url) - pass0

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": ms("50%"),
        "p99": ms("99%"),
        "bad": int(bad.group(1)) if bad else 0,
        "cpu_ms": 1e3 * cpu / max(requests, 1),
        "pass_ms": 1e3 * passes / max(requests, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=5)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk: not found (Debian: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-overhead-"))
    tokens = register_tenants(work, args.tenants, None, SIZE, QUICK_MODEL)
    body = npy_body(work / "one.npy", 1, SIZE, 0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(work / "root", port, args.window_ms, args.connections, 20, "--metrics")
    try:
        for token in tokens:  # every adapter loaded before anything is timed
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"}
            httpx.post(f"{url}/v1/predict", content=Path(body).read_bytes(), headers=headers, timeout=120)
        predict = lua_script(work / "predict.lua", tokens, body)
        floor = lua_script(work / "healthz.lua", tokens, None)
        wrk(url, predict, args.connections, 3, server.pid)  # warm-up
        t0 = time.perf_counter()
        results = {
            "POST /v1/predict": wrk(url, predict, args.connections, args.seconds, server.pid),
            "GET /healthz": wrk(url, floor, args.connections, args.seconds, server.pid),
        }
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n## ppvit serve's cost per request: {QUICK_MODEL} at {SIZE} px, {args.tenants} tenants, "
        f"{args.connections} wrk connections, one image a request, {args.seconds:g} s a run "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print("| route | requests/s | p50 ms | p99 ms | non-2xx | server CPU ms / request | of which passes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['bad']} | {r['cpu_ms']:.2f} | "
            f"{r['pass_ms']:.2f} |"
        )
    predict, floor = results["POST /v1/predict"], results["GET /healthz"]
    beside = predict["cpu_ms"] - predict["pass_ms"]
    print(
        f"\npredict's CPU per request beside the model's passes: {beside:.2f} ms, "
        f"{beside / floor['cpu_ms']:.2f}x the HTTP floor's {floor['cpu_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
