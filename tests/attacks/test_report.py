"""The one report writer: strict JSON whatever the floats (and every JSON under docs/), the figure's name."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ppvit._io import json_safe, json_text
from ppvit.attacks.report import write_report

DOCS = Path(__file__).resolve().parents[2] / "docs"


def strict_load(text: str) -> Any:
    """Python's json, refusing what it accepts beyond the standard (Infinity, -Infinity, NaN)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (math.nan, None),
        (np.float64("inf"), "inf"),  # numpy's floats are floats
        (1.5, 1.5),
        ({"a": [1, (math.inf, 2.0)], "b": {"c": math.nan}}, {"a": [1, ["inf", 2.0]], "b": {"c": None}}),
        ({"a": [1, (0.5, "s")], "b": {"c": None}}, {"a": [1, [0.5, "s"]], "b": {"c": None}}),  # written as it is
    ],
)
def test_non_finite_floats_follow_one_convention(value: Any, written: Any) -> None:
    assert json_safe(value) == written
    assert strict_load(json_text({"x": value})) == {"x": written}


def test_the_writer_maps_non_finite_values_and_keeps_the_report_as_it_was(tmp_path: Path) -> None:
    report = {"size": 32, "schemes": [{"scheme": "shuffle", "psnr_db": math.inf, "ssim": math.nan, "low": -math.inf}]}
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    write_report(report, {"shuffle": {"plain": image, "encrypted": image}}, tmp_path)
    text = (tmp_path / "audit.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert strict_load(text)["schemes"][0] == {"scheme": "shuffle", "psnr_db": "inf", "ssim": None, "low": "-inf"}
    assert report["schemes"][0]["psnr_db"] == math.inf  # the caller's floats are left alone
    assert (tmp_path / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_ciphertext_only_report_gets_its_own_figure_even_with_nothing_attacked(tmp_path: Path) -> None:
    write_report({"ciphertext_only": {"schemes": []}}, {}, tmp_path)
    assert (tmp_path / "ciphertext-only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "audit.png").exists()
    assert strict_load((tmp_path / "audit.json").read_text()) == {"ciphertext_only": {"schemes": []}}


@pytest.mark.parametrize("path", sorted(DOCS.rglob("*.json")), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_json_under_docs_is_strict_json(path: Path) -> None:
    strict_load(path.read_text())
