"""benchmarks/bench_gpu.py on the CPU (its --tiny smoke run): the ratios are the arithmetic they claim."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_runs_on_a_cpu_and_its_ratios_are_what_they_say(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--tiny", "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == out
    assert set(out) >= {"eager"} and "compiled" not in out  # a CPU: eager alone unless asked
    full, lora = out["eager"]["full"], out["eager"]["lora-pe"]
    for r in (full, lora):
        assert r["ceiling_of_peak"] == pytest.approx(
            r["ceiling_img_s"] * r["gflop_per_img"] / 1e3 / out["bf16_matmul_tflops"]
        )
        assert r["pipeline_of_ceiling"] == pytest.approx(r["pipeline_img_s"] / r["ceiling_img_s"])
    assert out["eager"]["lora_pe_step_over_full"] == pytest.approx(full["pipeline_img_s"] / lora["pipeline_img_s"])
    # frozen weights need no weight gradients: lora-pe's backward counts fewer FLOPs than full's
    assert lora["gflop_per_img"] < full["gflop_per_img"]
