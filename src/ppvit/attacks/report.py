"""The one writer of ``ppvit audit``'s reports: ``audit.json``, its figure and the printed summary.

Two audits report (the attacks of :func:`ppvit.attacks.audit.run_audit`, and ciphertext-only key
recovery of :func:`ppvit.attacks.ciphertext_only_audit.ciphertext_only_audit`, whose report sits under
the key ``"ciphertext_only"``); both go through here, so both write strict JSON the same way
(:func:`ppvit._io.json_safe`: an exact decryption's infinite PSNR as ``"inf"``, a missing value as
null) and draw the same figure. The in-memory report keeps its floats; only the file maps them.
Reports hold fractions, image metrics and key fingerprints, never a key or a recovered plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ppvit._io import atomic_write, atomic_write_json

Figures = dict[str, dict[str, np.ndarray]]
"""The figure's rows: a row title (the scheme) -> {image title -> an HWC image, or NHWC images side by side}."""


def figure_name(report: dict[str, Any]) -> str:
    """The figure's file name: ``ciphertext-only.png`` for a ciphertext-only report, else ``audit.png``."""
    return "ciphertext-only.png" if "ciphertext_only" in report else "audit.png"


def write_report(report: dict[str, Any], figures: Figures, out: str | Path) -> None:
    """``out/audit.json`` (strict JSON) and the figure (:func:`figure_name`), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit.json", report)
    fig = _draw(figures)
    atomic_write(out / figure_name(report), lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def _draw(figures: Figures) -> Any:
    """A grid of titled images, one row per scheme (the scheme named under the row's first title)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend touched

    rows = [(scheme, {title: _side_by_side(img) for title, img in cells.items()}) for scheme, cells in figures.items()]
    cols = max((len(cells) for _, cells in rows), default=1)
    aspect = max((img.shape[1] / img.shape[0] for _, cells in rows for img in cells.values()), default=1.0)
    fig = Figure(figsize=(2.2 * cols * aspect, 2.4 * max(len(rows), 1)))
    axes = fig.subplots(max(len(rows), 1), cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (scheme, cells) in enumerate(rows):
        for c, (title, img) in enumerate(cells.items()):
            axes[r][c].imshow(img)
            label = "\n" + scheme.replace("+", "+\n") if c == 0 else ""  # long schemes: one step a line
            axes[r][c].set_title(title + label, fontsize=9)
    if not rows:
        axes[0][0].text(0.5, 0.5, "no scheme attacked", ha="center", va="center")
    fig.tight_layout()
    return fig


def _side_by_side(images: np.ndarray) -> np.ndarray:
    """An HWC image as it is; NHWC images in one row, 2 pixels of white between them."""
    if images.ndim == 3:
        return images
    gap = np.full((images.shape[1], 2, images.shape[3]), 255, dtype=images.dtype)
    return np.concatenate([part for img in images for part in (img, gap)][:-1], axis=1)


def format_report(report: dict[str, Any]) -> str:
    """The printed summary of either report: the attacks per scheme, or the ciphertext-only table."""
    if "ciphertext_only" in report:
        return _format_ciphertext_only(report["ciphertext_only"])
    return _format_audit(report)


def _format_audit(report: dict[str, Any]) -> str:
    """One block per scheme, then the weight-matching results."""
    lines = [
        f"audit at {report['size']}x{report['size']}, {report['block_size']}x{report['block_size']} blocks, "
        f"{report['resize']} resize, key {report['key_fingerprint']}"
    ]
    for s in report["schemes"]:
        co = s["ciphertext_only"]
        lines.append(f"\n{s['scheme']}")
        lines.append(
            f"  ciphertext only: PSNR {co['psnr_db']:.1f} dB, SSIM {co['ssim']:.3f}; brightness thumbnail "
            f"PSNR {co['thumbnail_psnr_db']:.1f} dB; block histograms kept {co['block_histograms_kept']:.0%}, "
            f"blocks verbatim {co['blocks_verbatim']:.0%}; jigsaw (edge similarity over {report['images_seen']} "
            f"ciphertexts) finds {co['jigsaw_neighbours']:.0%} of block neighbours"
        )
        for k in s["kpa"]:
            lines.append(
                f"  known plaintext, {k['pairs']} pair(s): {k['plan_recovered']:.1%} of the plan recovered, "
                f"held-out images decrypted at {k['held_out_psnr_db']:.1f} dB"
            )
        lines.append(f"  the same attack on a fresh key's images: {s['fresh_key_psnr_db']:.1f} dB")
    watched = report.get("leakage_during_training")
    if watched:
        steps = ", ".join(f"{c['step']}: {c['pixel_permutation']:.0%}" for c in watched["curve"])
        lines.append(f"\nweight matching while training {watched['config']} (step: pixels recovered): {steps}")
    for name, score in report.get("weights", {}).items():
        b = score["block_permutation"]
        lines.append(
            f"\nweight matching, {name}: pixel permutation {score['pixel_permutation']:.1%}"
            + ("" if b is None else f", block permutation {b:.1%}")
        )
    return "\n".join(lines)


def _format_ciphertext_only(co: dict[str, Any]) -> str:
    """One line per scheme and N: keys exact, mean shares, PSNR, SSIM, time."""
    lines = [
        f"ciphertext-only key recovery at {co['size']}x{co['size']}, {co['block_size']}x{co['block_size']} blocks, "
        f"{co['resize']} resize, {len(co['key_fingerprints'])} key(s) ({co['keys']}), "
        f"{co['held_out_images']} held-out images",
        f"{'scheme':<40} {'N':>5} {'exact':>7} {'up to sym.':>10} {'mean exact':>10} {'mean sym.':>9} "
        f"{'PSNR dB':>8} {'SSIM':>6} {'s/key':>6}",
    ]
    for s in co["schemes"]:
        if s["status"] != "attacked":
            lines.append(f"{s['scheme']:<40} {s['status']}")
            continue
        for r in s["summary"]:
            k = r["keys"]
            lines.append(
                f"{s['scheme']:<40} {r['n']:>5} {r['keys_exact']:>5}/{k} {r['keys_exact_up_to_symmetry']:>8}/{k} "
                f"{r['mean_exact']:>10.3f} {r['mean_up_to_symmetry']:>9.3f} {r['median_psnr_db']:>8.1f} "
                f"{r['mean_ssim']:>6.3f} {r['mean_seconds']:>6.1f}"
            )
    return "\n".join(lines)
