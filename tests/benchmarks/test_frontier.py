"""benchmarks/frontier.py: the table lists every scheme of docs/frontier.json, and no accuracy is drawn
for a scheme without a measured one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _frontier():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_lists_every_scheme_of_the_data_file() -> None:
    frontier = _frontier()
    doc = frontier.load(ROOT / "docs" / "frontier.json")
    rows = frontier.table(doc).splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [e["scheme"] for e in doc["schemes"]]
    assert {"none", "shuffle", "shuffle+scramble", "full EtC", "mix", "lift"} <= {e["scheme"] for e in doc["schemes"]}
    by_name = dict(zip([e["scheme"] for e in doc["schemes"]], rows, strict=True))
    assert "| 49.83 ± 2.20 | 46.32 ± 0.55 | 47.92 ± 1.31 | whole key | 5 |" in by_name["shuffle"]
    assert "| 44.62 ± 0.43 | - | 36.93 ± 2.39 (1x) |" in by_name["shuffle+scramble"]  # melo not run; the old rate
    for e in doc["schemes"]:
        assert (e["accuracy"] is None) == ("| pending | pending | pending |" in by_name[e["scheme"]])


def _doc(accuracy) -> dict:
    measured = {"full": [80.0, 1.0], "melo": [75.0, 1.0], "lora-pe": [70.0, 2.0]}
    return {
        "thumbnail_psnr_db": 19.5,
        "schemes": [
            {"scheme": "a", "accuracy": measured, "attack": {"psnr_db": "inf", "n": 5, "what": "x"}},
            {"scheme": "b", "accuracy": accuracy, "attack": {"psnr_db": 31.0, "n": 10, "what": "y"}},
        ],
    }


def test_no_accuracy_is_drawn_for_a_scheme_without_one(tmp_path) -> None:
    frontier = _frontier()
    ax = frontier.plot(_doc(None)).axes[0]
    drawn = [(x, y) for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]
    assert (frontier.attack_x(_doc(None))["a"], 80.0) in drawn  # the measured scheme's mean is a point
    assert not [p for p in drawn if p[0] == 31.0 and p[1] > 0]  # the pending one: no accuracy at its x
    hollow = [c.get_offsets().tolist() for c in ax.collections if len(c.get_offsets())]
    assert [[31.0, 0.0]] in hollow  # ... but a marker on the x axis
    assert "pending" in next(t.get_text() for t in ax.texts if t.get_text().startswith("b"))
    ax = frontier.plot(_doc({"full": [60.0, 1.0], "melo": None, "lora-pe": [50.0, 1.0]})).axes[0]  # can fail
    assert (31.0, 60.0) in [
        (x, y) for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
    ]


def test_a_bad_accuracy_names_the_file(tmp_path) -> None:
    bad = tmp_path / "frontier.json"
    bad.write_text(json.dumps(_doc({"full": [60.0, 1.0]})))
    with pytest.raises(ValueError, match=r"frontier.json: b: accuracy needs"):
        _frontier().load(bad)


def test_a_method_not_run_is_left_out_and_lora_pe_at_the_old_rate_is_hollow() -> None:
    frontier = _frontier()
    doc = _doc({"full": [60.0, 1.0], "melo": None, "lora-pe": [50.0, 1.0]})
    doc["schemes"][1]["lora_pe_at"] = "1x"
    ax = frontier.plot(doc).axes[0]
    means = [line for line in ax.lines if line.get_marker() in frontier.METHODS.values()]  # not the error bars
    at_b = {y: line.get_markerfacecolor() for line in means for x, y in zip(*line.get_data(), strict=True) if x == 31.0}
    assert set(at_b) == {60.0, 50.0}  # full and lora-pe; melo, not run, is not drawn
    assert at_b[50.0] == "none" and at_b[60.0] != "none"
    row = frontier.table(doc).splitlines()[-1]
    assert "| 60.00 ± 1.00 | - | 50.00 ± 1.00 (1x) |" in row
    doc["schemes"][1]["lora_pe_at"] = "2x"
    with pytest.raises(ValueError, match="lora_pe_at"):
        frontier.check(doc, Path("frontier.json"))
