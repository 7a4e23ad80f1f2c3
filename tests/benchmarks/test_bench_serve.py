"""benchmarks/bench_serve.py's profile (gpu_check.sh's serve stage runs it on CUDA; here its CPU path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_profile_names_the_operator_that_took_the_time(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))  # bench_serve's own imports are siblings
    try:
        spec = importlib.util.spec_from_file_location("bench_serve", BENCHMARKS / "bench_serve.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARKS))
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    bench.profile({"matmuls": lambda: [a @ b for _ in range(20)], "adds": lambda: a + b}, torch.device("cpu"), 3)
    out = capsys.readouterr().out
    matmuls, adds = out.split("### adds")
    assert "### matmuls, 3 tenants" in matmuls
    # the first row of the table is the operator with the most self time: the matrix product
    first_row = next(line for line in matmuls.splitlines() if line.strip().startswith("aten::"))
    assert first_row.strip().startswith(("aten::mm", "aten::matmul")), first_row
    assert "aten::add" in adds and "aten::mm" not in adds
