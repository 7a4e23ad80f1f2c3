"""What ``ppvit serve`` spends per request beside the model: server CPU per request, against its own HTTP floor.

On a GPU the model's pass is short (64 ViT-Ti/16 images at 224 in about 7 ms on an H200) and a
one-image request's Python (HTTP, auth, decoding, batching, the answer) is what bounds the rate
(BENCHMARKS.md: 148 requests/s there, as on 2 CPU cores). This measures that Python on any machine:
a ``ppvit serve`` process with ``--tenants`` lora-pe tenants of the micro ViT at 32 px (a model that
costs little), loaded by ``wrk`` (Debian's ``wrk``, a C load generator: the load costs the server's
cores little) with ``--connections`` connections, one ciphertext a request, tokens in turn; then
``GET /healthz`` with the same connections: the floor, the framework's own cost of a request. For
each: requests/s, p50/p99, errors (non-2xx answers, and socket errors: a request unanswered within
60 s is one), the server process's CPU time (user + system, all threads, from
``/proc``) per request and its routed passes' time per request (``ppvit_pass_seconds``); then
predict's CPU beside the passes against the floor's.

On a GPU (``--device cuda --model vit_tiny_patch16_224 --size 224 --weights $PPVIT_WEIGHTS``, as
``gpu_check.sh`` runs it) the same load measures what issue 30 asks of serving there: requests/s and
p50/p99 at a stated load, the clients in a process of their own (``bench_serve.py``'s loopback clients
shared the server's interpreter). Predict's CPU beside the passes is printed for the micro ViT on the
CPU only: elsewhere a pass's wall time is the device's, or the CPU of several torch threads, not what
the server's CPU spent on it.

Usage (a quiet machine; Linux, wrk on the PATH or ``--wrk``):
    python benchmarks/bench_serve_overhead.py [--seconds 15] [--connections 32] [--tenants 16] [--images 1]
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
from pathlib import Path

import httpx
from bench_serve import register_tenants
from bench_serve_load import QUICK_MODEL, free_port, npy_body, start_server


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


def wrk(binary: str, url: str, script: Path, connections: int, seconds: float, pid: int) -> dict[str, float]:
    """One wrk run: requests/s, p50/p99 ms, errors, the server's CPU ms per request and its
    passes' ms per request (wall time of the forward thread: on a CPU, CPU time too)."""
    cmd = [binary, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "60s", "--latency", "-s", str(script)]
    cmd.append(url)
    cpu0, pass0 = cpu_seconds(pid), pass_seconds(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    cpu, passes = cpu_seconds(pid) - cpu0, pass_seconds(url) - pass0
    result = parse_wrk(out)
    result["cpu_ms"] = 1e3 * cpu / max(result["requests"], 1)
    result["pass_ms"] = 1e3 * passes / max(result["requests"], 1)
    return result


def parse_wrk(out: str) -> dict[str, float]:
    """wrk's report (``--latency``): requests, requests/s, p50/p99 in ms, non-2xx answers and socket errors
    (connect, read, write, timeout) together."""

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": ms("50%"),
        "p99": ms("99%"),
        "bad": (int(bad.group(1)) if bad else 0) + (sum(map(int, sockets.groups())) if sockets else 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--images", type=int, default=1, help="images a request (default 1)")
    ap.add_argument("--window-ms", type=float, default=5)
    ap.add_argument("--device", default="cpu", help="the server's torch device (cuda on a GPU)")
    ap.add_argument("--model", default=QUICK_MODEL, help=f"the tenants' backbone (default {QUICK_MODEL})")
    ap.add_argument("--size", type=int, default=32, help="input size (default 32)")
    ap.add_argument("--weights", help="the backbone's weights file (default: a seeded random backbone)")
    ap.add_argument("--wrk", default="wrk", help="the wrk binary (default: wrk on the PATH)")
    ap.add_argument("--cuda-graphs", action="store_true", help="the server replays its passes as CUDA graphs")
    args = ap.parse_args()
    binary = shutil.which(args.wrk)
    if binary is None:
        raise SystemExit(f"{args.wrk}: not found (Debian: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-overhead-"))
    tokens = register_tenants(work, args.tenants, args.weights, args.size, args.model)
    body = npy_body(work / "body.npy", args.images, args.size, 0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ("--metrics", "--device", args.device, *(["--cuda-graphs"] if args.cuda_graphs else []))
    server = start_server(work / "root", port, args.window_ms, args.connections, 20, *flags)
    try:
        for token in tokens:  # every adapter loaded before anything is timed
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"}
            httpx.post(f"{url}/v1/predict", content=Path(body).read_bytes(), headers=headers, timeout=120)
        predict = lua_script(work / "predict.lua", tokens, body)
        floor = lua_script(work / "healthz.lua", tokens, None)
        wrk(binary, url, predict, args.connections, 3, server.pid)  # warm-up
        print(
            f"\n## ppvit serve's cost per request: {args.model} at {args.size} px on {args.device}, "
            f"{args.tenants} tenants, {args.connections} wrk connections, {args.images} image(s) a request, "
            f"{args.seconds:g} s a run{', passes replayed as CUDA graphs' if args.cuda_graphs else ''}"
        )
        print("| route | requests/s | p50 ms | p99 ms | errors | server CPU ms / request | of which passes |")
        print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
        results = {}
        for name, script in (("POST /v1/predict", predict), ("GET /healthz", floor)):  # each row as it lands
            r = results[name] = wrk(binary, url, script, args.connections, args.seconds, server.pid)
            print(
                f"| {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['bad']} | {r['cpu_ms']:.2f} | "
                f"{r['pass_ms']:.2f} |",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    predict, floor = results["POST /v1/predict"], results["GET /healthz"]
    print(f"\nimages/s answered: {predict['rps'] * args.images:.0f}")
    if args.device == "cpu" and args.model == QUICK_MODEL:  # see the module's docstring
        beside = predict["cpu_ms"] - predict["pass_ms"]
        print(
            f"predict's CPU per request beside the model's passes: {beside:.2f} ms, "
            f"{beside / floor['cpu_ms']:.2f}x the HTTP floor's {floor['cpu_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
