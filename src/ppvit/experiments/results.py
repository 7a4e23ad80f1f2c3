"""Result tables of ``ppvit reproduce``: mean and spread over seeds per method and data, and the plot."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ppvit._io import atomic_write, atomic_write_json, atomic_write_text
from ppvit.models.methods import param_report
from ppvit.train.runs import RunResult


def speeds_text(speeds: dict[str, float]) -> str:
    """``full 44, linear 140``: measured training speeds (img/s) as the estimate and the table say them."""
    return ", ".join(f"{method} {value:.0f}" for method, value in speeds.items())


@dataclass
class Cell:
    """One trained cell of a comparison: its result, or the error that stopped it."""

    method: str
    scheme: str  # "none" is plain images
    seed: int
    result: RunResult | None = None
    error: str | None = None


@dataclass
class ResultRow:
    method: str
    data: str  # "plain" or the scheme
    seeds: int
    acc_mean: float | None
    acc_std: float | None
    trainable: int
    pct_of_full: float
    seconds: float | None
    images_per_s: float | None
    peak_mb: float | None
    paper: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class ResultTable:
    preset: str
    model: str
    upstream_acc: float | None
    rows: list[ResultRow]
    cells: list[Cell]
    # what the cells ran on, beyond the preset: data, key fingerprint, weights, overrides (a smoke run says so)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cells(
        cls,
        preset: str,
        model: str,
        cells: list[Cell],
        upstream_acc: float | None = None,
        paper: dict[str, float] | None = None,
        img_size: int | None = None,
    ) -> ResultTable:
        """Rows in the order cells first name each (method, data); counts from the model itself."""
        classes = next((c.result.num_classes for c in cells if c.result), 10)
        counts = {r.method: r.trainable for r in param_report(model, classes, img_size=img_size)}
        rows = [
            _row(method, scheme, [c for c in cells if (c.method, c.scheme) == (method, scheme)], counts, paper or {})
            for method, scheme in dict.fromkeys((c.method, c.scheme) for c in cells)
        ]
        return cls(preset, model, upstream_acc, rows, cells)

    def markdown(self) -> str:
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines = [
            f"preset `{self.preset}`, model `{self.model}`"
            + (f", upstream (plain) test accuracy {100 * self.upstream_acc:.2f}%" if self.upstream_acc else ""),
            *self._settings_lines(),
            "",
            "| method | data | test acc. % (mean ± sd, n seeds) | paper % | trainable | M | 2^20 | % of full "
            "| train s | img/s | peak MB |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            acc = "failed" if r.acc_mean is None else f"{r.acc_mean:.2f} ± {f(r.acc_std, '.2f')} (n={r.seeds})"
            lines.append(
                f"| {r.method} | {r.data} | {acc} | {f(r.paper, '.2f')} | {r.trainable:,} | {r.trainable / 1e6:.3f} "
                f"| {r.trainable / 2**20:.2f} | {r.pct_of_full:.3f} | {f(r.seconds, '.0f')} "
                f"| {f(r.images_per_s, '.0f')} | {f(r.peak_mb, '.0f')} |"
            )
        errors = [f"- {r.method} / {r.data}: {e}" for r in self.rows for e in r.errors]
        return "\n".join(lines + (["", "Failed cells:", *errors] if errors else [])) + "\n"

    def _settings_lines(self) -> list[str]:
        s = self.settings
        if not s:
            return []
        overrides = ", ".join(f"{k}={v}" for k, v in s.get("overrides", {}).items())
        lines = [f"data `{s.get('data')}`, key {s.get('key_fingerprint')}, weights `{s.get('weights')}`"]
        if overrides:
            lines.append(f"**overrides of the preset: {overrides}** (not the preset's protocol)")
        if budget := s.get("budget"):
            lines.append(
                f"**sized to the {budget['minutes']:g}-minute budget: {budget['train_subset']:,} training images "
                f"instead of {budget['preset_train_subset']:,}** (estimated {budget['estimate_min']:g} min here at "
                f"the preset's size; training img/s {speeds_text(budget['speeds'])})"
            )
        return lines

    def write(self, out: Path) -> None:
        """results.md, results.csv, results.json and results.png, each written atomically."""
        atomic_write_text(out / "results.md", self.markdown())
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[k for k in asdict(self.rows[0]) if k != "errors"])
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: v for k, v in asdict(r).items() if k != "errors"})
        atomic_write_text(out / "results.csv", buf.getvalue())
        atomic_write_json(out / "results.json", asdict(self))
        self.plot(out / "results.png")

    def plot(self, path: Path) -> None:
        """Accuracy against trainable parameters (log scale), plain and encrypted marked."""
        fig = Figure(figsize=(6.5, 4.2))  # not pyplot: no global backend or figure registry touched
        ax = fig.subplots()
        for data, marker in (("plain", "o"), *((d, "s") for d in {r.data for r in self.rows} - {"plain"})):
            rows = [r for r in self.rows if r.data == data and r.acc_mean is not None]
            ax.errorbar(
                [r.trainable for r in rows],
                [r.acc_mean for r in rows],
                yerr=[r.acc_std or 0 for r in rows],
                fmt=marker,
                capsize=3,
                label=data if data == "plain" else f"encrypted ({data})",
            )
            for r in rows:
                ax.annotate(r.method, (r.trainable, r.acc_mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(
            xscale="log",
            xlabel="trainable parameters",
            ylabel="test accuracy (%)",
            title=f"ppvit reproduce --preset {self.preset} ({self.model})",
        )
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _row(method: str, scheme: str, group: list[Cell], counts: dict[str, int], paper: dict[str, float]) -> ResultRow:
    ok = [c.result for c in group if c.result is not None]
    accs = np.array([100 * r.test_acc for r in ok])

    def mean(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    return ResultRow(
        method,
        "plain" if scheme == "none" else scheme,
        len(ok),
        float(accs.mean()) if len(ok) else None,
        float(accs.std(ddof=1)) if len(ok) > 1 else None,
        counts[method],
        100 * counts[method] / counts["full"],
        mean([r.train_seconds for r in ok]),
        mean([r.images_per_s for r in ok]),
        max((r.peak_rss_mb for r in ok if r.peak_rss_mb), default=None),
        paper.get(method) if scheme != "none" else None,
        [c.error for c in group if c.error],
    )
