"""bench_serve.py's profile and bench_serve_overhead.py's reading of wrk (gpu_check.sh runs both on CUDA)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    """A benchmark script as a module (its own imports are siblings under benchmarks/)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench


def test_profile_names_the_operator_that_took_the_time(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_serve")
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    bench.profile({"matmuls": lambda: [a @ b for _ in range(20)], "adds": lambda: a + b}, torch.device("cpu"), 3)
    out = capsys.readouterr().out
    matmuls, adds = out.split("### adds")
    assert "### matmuls, 3 tenants" in matmuls
    # the first row of the table is the operator with the most self time: the matrix product
    first_row = next(line for line in matmuls.splitlines() if line.strip().startswith("aten::"))
    assert first_row.strip().startswith(("aten::mm", "aten::matmul")), first_row
    assert "aten::add" in adds and "aten::mm" not in adds


def test_the_peft_baseline_runs_each_image_through_the_adapter_it_names() -> None:
    """PEFT's adapter_names mixed batch (issue 30's baseline): each row is its named adapter's, and the adapters
    differ (LoRA, patch embedding and head each its own), so the baseline does each adapter's work."""
    bench = load("bench_serve")
    model = bench.peft_mixed(None, 32, 3, torch.device("cpu"))
    x, names = torch.randn(4, 3, 32, 32), ["t0", "t2", "t1", "t2"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        alone = torch.cat([model(x[i : i + 1], adapter_names=[n]) for i, n in enumerate(names)])
        other = model(x[:1], adapter_names=["t1"])
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-5)
    assert (mixed[0] - other[0]).abs().max() > 1e-3


WRK_REPORT = """Running 3s test @ http://127.0.0.1:8766/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    37.58ms   15.35ms  45.86ms   85.71%
    Req/Sec    24.29     19.88    50.00     57.14%
  Latency Distribution
     50%   43.93ms
     75%   43.97ms
     90%   43.98ms
     99%    1.20s
  18 requests in 3.00s, 2.03KB read
  Socket errors: connect 0, read 0, write 0, timeout 4
  Non-2xx or 3xx responses: 7
Requests/sec:      5.99
Transfer/sec:     693.39B
"""  # Debian's wrk 4.1.0, a server answering 404 to a third and sleeping past the timeout on a third (p99 edited)


def test_a_wrk_report_counts_timeouts_as_errors() -> None:
    """bench_serve_overhead reads wrk's report: latencies in their units, and requests wrk gave up on (socket
    timeouts; without them a run whose every request timed out read as p50 0 ms and no error) beside non-2xx."""
    bench = load("bench_serve_overhead")
    assert bench.parse_wrk(WRK_REPORT) == {"requests": 18, "rps": 5.99, "p50": 43.93, "p99": 1200.0, "bad": 11}
    clean = WRK_REPORT.replace("  Socket errors: connect 0, read 0, write 0, timeout 4\n", "")
    assert bench.parse_wrk(clean.replace("  Non-2xx or 3xx responses: 7\n", ""))["bad"] == 0
