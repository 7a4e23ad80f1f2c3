"""The frontier (issue 28): accuracy against the attacker's best reconstruction, every scheme of ppvit.

Reads one hand-written data file (``docs/frontier.json``: each figure names the section of
RESULTS.md or docs/THREAT_MODEL.md that measured it), writes the plot and prints the markdown
table. x: the best ciphertext-only attack's PSNR (dB) on held-out images; a recovered key decrypts
every image exactly and sits at the right edge, "whole key", with the plain images. y: test
accuracy (%) of ``full``, ``melo`` and ``lora-pe`` at the ``cpu`` preset; a method not measured on a
scheme is left out (``-`` in the table), a scheme with no accuracy at all is drawn on the x axis
only, hollow, "accuracy pending": no number is made up. ``lora-pe`` measured before the preset
trained its patch embedding at 0.1x (``"lora_pe_at": "1x"``) is drawn hollow and marked "(1x)".

Usage:
    python benchmarks/frontier.py --data docs/frontier.json --out docs/frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no global backend touched

METHODS = {"full": "o", "melo": "^", "lora-pe": "s"}  # marker per method
WHOLE_KEY_GAP = 12.0  # dB right of the largest finite PSNR where "whole key" is drawn


def load(path: Path) -> dict[str, Any]:
    """The data file, checked by :func:`check`."""
    return check(json.loads(path.read_text()), path)


def check(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """Every scheme has an attack; an accuracy is null or {method: [mean, sd] or null}; errors name ``path``."""
    for entry in doc["schemes"]:
        name, acc = entry["scheme"], entry["accuracy"]
        if acc is not None and set(acc) != set(METHODS):
            raise ValueError(f"{path}: {name}: accuracy needs {sorted(METHODS)}, got {sorted(acc)}")
        if acc is not None and acc["full"] is None:
            raise ValueError(f"{path}: {name}: a measured scheme needs full's accuracy (its label's place)")
        if entry.get("lora_pe_at", "0.1x") not in ("0.1x", "1x"):
            raise ValueError(f"{path}: {name}: lora_pe_at must be '0.1x' or '1x', got {entry['lora_pe_at']!r}")
        x = entry["attack"]["psnr_db"]
        if not (x in ("inf", "plain") or isinstance(x, int | float)):
            raise ValueError(f"{path}: {name}: attack psnr_db must be a number, 'inf' or 'plain', got {x!r}")
    return doc


def attack_x(doc: dict[str, Any]) -> dict[str, float]:
    """Each scheme's x position: its PSNR, or the "whole key" edge for 'inf' and 'plain'."""
    finite = [e["attack"]["psnr_db"] for e in doc["schemes"] if e["attack"]["psnr_db"] not in ("inf", "plain")]
    edge = max([doc["thumbnail_psnr_db"], *finite]) + WHOLE_KEY_GAP
    return {
        e["scheme"]: edge if e["attack"]["psnr_db"] in ("inf", "plain") else e["attack"]["psnr_db"]
        for e in doc["schemes"]
    }


def table(doc: dict[str, Any]) -> str:
    """The markdown table: one row per scheme, accuracy as measured or 'pending'."""
    lines = [
        "| scheme | `full` (%) | `melo` (%) | `lora-pe` (%) | best ciphertext-only attack | ciphertexts "
        "| what it gets |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for e in doc["schemes"]:
        acc = e["accuracy"]
        cells = ["pending" if acc is None else _cell(acc[m], m == "lora-pe" and _old(e)) for m in METHODS]
        x = e["attack"]["psnr_db"]
        named = {"inf": "whole key", "plain": "plain (no attack needed)"}
        shown = named[x] if isinstance(x, str) else f"{x:.1f} dB"
        n = e["attack"]["n"]
        lines.append(f"| {e['scheme']} | {' | '.join(cells)} | {shown} | {n if n else '-'} | {e['attack']['what']} |")
    return "\n".join(lines)


def _old(entry: dict[str, Any]) -> bool:
    """lora-pe measured at the patch embedding's old rate (1x), before the preset's 0.1x."""
    return entry.get("lora_pe_at") == "1x"


def _cell(acc: list[float] | None, old: bool) -> str:
    return "-" if acc is None else f"{acc[0]:.2f} ± {acc[1]:.2f}" + (" (1x)" if old else "")


def plot(doc: dict[str, Any]) -> Figure:
    """Accuracy (y) against the attacker's PSNR (x); pending schemes hollow on the x axis."""
    xs = attack_x(doc)
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    bottom = 0.0
    for i, e in enumerate(doc["schemes"]):
        colour, x = f"C{i}", xs[e["scheme"]]
        if e["accuracy"] is None:
            ax.scatter([x], [bottom], s=90, facecolors="none", edgecolors=colour, clip_on=False, zorder=3)
            ax.annotate(
                f"{e['scheme']}: accuracy pending",
                (x, bottom),
                (4, 8),
                textcoords="offset points",
                color=colour,
                fontsize=8,
                rotation=90,
            )
            continue
        for method, marker in METHODS.items():
            if e["accuracy"][method] is None:
                continue
            mean, sd = e["accuracy"][method]
            face = "none" if method == "lora-pe" and _old(e) else colour
            ax.errorbar([x], [mean], yerr=[sd], fmt=marker, color=colour, mfc=face, capsize=3)
        ax.annotate(
            e["scheme"], (x, e["accuracy"]["full"][0]), (6, 2), textcoords="offset points", color=colour, fontsize=8
        )
    ax.axvline(doc["thumbnail_psnr_db"], color="grey", ls="--", lw=0.8)
    ax.annotate(
        "thumbnail", (doc["thumbnail_psnr_db"], 95), (3, 0), textcoords="offset points", color="grey", fontsize=8
    )
    edge = max(xs.values())
    ticks = [t for t in range(10, int(edge - WHOLE_KEY_GAP / 2), 5)]
    ax.set_xticks([*ticks, edge], [*map(str, ticks), "whole key"])
    ax.set_xlim(5, edge + 3)
    ax.set_ylim(bottom, 100)
    ax.set_xlabel("attacker's best reconstruction of held-out images, PSNR (dB), ciphertexts only")
    ax.set_ylabel("test accuracy (%), cpu preset, 3 seeds")
    for method, marker in METHODS.items():
        ax.scatter([], [], marker=marker, color="k", label=method)
    ax.scatter([], [], marker="s", facecolors="none", edgecolors="k", label="lora-pe, patch embedding at 1x")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("ppvit's schemes: accuracy against what ciphertexts give away", fontsize=10)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("docs/frontier.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/frontier.png"))
    args = parser.parse_args()
    doc = load(args.data)
    plot(doc).savefig(args.out, dpi=120)
    print(table(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
