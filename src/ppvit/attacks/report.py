"""The one writer of ``ppvit audit``'s reports: ``audit.json``, its figure and the printed summary.

Three audits report: the attacks of :func:`ppvit.attacks.audit.run_audit`, and ciphertext-only key
recovery on simulated uploads (:func:`ppvit.attacks.ciphertext_only_audit.ciphertext_only_audit`) or
on a user's stored ciphertexts (:func:`ppvit.attacks.uploaded_audit.audit_uploaded`), both under the
key ``"ciphertext_only"`` (``"attacked"``: ``"simulated"`` or ``"stored"``). All go through here, so
all write strict JSON the same way (:func:`ppvit._io.json_safe`: an exact decryption's infinite PSNR
as ``"inf"``, a missing value as null) and draw the same figure; the images a stored attack decrypts
are written as PNGs for the user to look at. The in-memory report keeps its floats; only the file
maps them. Reports hold fractions, image metrics and key fingerprints, never a key or a recovered plan.
Each printed figure is named by the attack that produced it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ppvit._io import atomic_write, atomic_write_json

SHOWN = 4  # held-out images per row of a stored-ciphertext audit's figure
RECOVERED = "recovered"  # OUT/recovered/: stored ciphertexts decrypted with a recovered plan, for the user to look at
Figures = dict[str, dict[str, np.ndarray]]
"""The figure's rows: a row title (the scheme) -> {image title -> an HWC image, or NHWC images side by side}."""


def figure_name(report: dict[str, Any]) -> str:
    """The figure's file name: ``ciphertext-only.png`` for a ciphertext-only report, else ``audit.png``."""
    return "ciphertext-only.png" if "ciphertext_only" in report else "audit.png"


def check_out(out: str | os.PathLike, data: str | os.PathLike | None = None) -> None:
    """An audit replaces its files in ``out`` (audit.json, the figure, the PNGs of recovered/): a folder of
    other files is refused (the user's photos under recovered/ were deleted), and so is one overlapping
    ``data`` (decrypted images were written into the encrypted dataset). Each audit entry point checks it
    first; the CLI also before its slow part, with ``--data`` (plain images reach the simulated audits as arrays)."""
    path = Path(out)
    if data is not None and Path(data).exists():
        src, dst = Path(data).resolve(), path.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise ValueError(f"--out {out}: overlaps --data {data}; give a folder apart from it")
    if path.is_dir() and any(path.iterdir()) and not (path / "audit.json").is_file():
        raise ValueError(f"--out {out}: holds other files and no audit.json of an earlier audit; give a new folder")


def write_report(report: dict[str, Any], figures: Figures, out: str | Path) -> None:
    """``out/audit.json`` (strict JSON) and the figure (:func:`figure_name`), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit.json", report)
    write_figure(figures, out / figure_name(report))


def write_figure(figures: Figures, path: Path) -> None:
    """The grid of titled images (one row per scheme), written atomically as a PNG."""
    fig = _draw(figures)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def write_recovered(folder: Path, paths: Sequence[str], images: np.ndarray) -> None:
    """Each image as a PNG under its dataset path in ``folder``; PNGs of an earlier audit there are removed."""
    written = set()
    for rel, image in zip(paths, images, strict=True):
        path = folder / Path(rel).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
        written.add(path)
    for old in folder.rglob("*.png"):
        if old not in written:
            old.unlink()


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
        f"{report['resize']} resize, key {report['key_fingerprint']}",
        "(key recovery from ciphertexts alone is a separate audit, not run here: `ppvit audit --ciphertext-only "
        "5,20`, on your encrypted folder with --data)",
    ]
    for s in report["schemes"]:
        co = s["ciphertext_only"]  # the statistics of ciphertext_stats, under the report's first name
        lines.append(f"\n{s['scheme']}")
        lines.append(
            f"  ciphertext as stored, no attack (against the plain image): PSNR {co['psnr_db']:.1f} dB, SSIM "
            f"{co['ssim']:.3f}; its block brightness as a thumbnail: PSNR {co['thumbnail_psnr_db']:.1f} dB; block "
            f"histograms kept {co['block_histograms_kept']:.0%}, blocks verbatim {co['blocks_verbatim']:.0%}"
        )
        lines.append(
            f"  jigsaw (edge similarity over {report['images_seen']} ciphertexts, no key): finds "
            f"{co['jigsaw_neighbours']:.0%} of block neighbours"
        )
        if "ica_search_psnr_db" in co:  # a mixing: attacks/block_mixing.py
            prior = max(k["pairs"] for k in s["kpa"])
            lines.append(
                f"  ciphertexts only, the {prior} pairs' plain images as the prior: second-order attack "
                f"{co['second_order_psnr_db']:.1f} dB, ICA search {co['ica_search_psnr_db']:.1f} dB (the block-mean "
                f"thumbnail: {co['thumbnail_reference_psnr_db']:.1f} dB)"
            )
        if "key_transformed_model" in s:
            m = s["key_transformed_model"]
            lines.append(
                f"  the key holder's model ({m['model']} made exact for the key) and the public one: held-out images "
                f"decrypted from its patch embedding at {m['held_out_psnr_db']:.1f} dB, SSIM {m['held_out_ssim']:.3f}"
            )
        for k in s["kpa"]:
            lines.append(
                f"  known plaintext, {k['pairs']} pair(s): {k['plan_recovered']:.1%} of the plan recovered, "
                f"held-out images decrypted at {k['held_out_psnr_db']:.1f} dB"
            )
        lines.append(
            f"  known plaintext, the plan from {s['kpa'][0]['pairs']} pair(s) on another key's images: "
            f"{s['fresh_key_psnr_db']:.1f} dB (a key per dataset)"
        )
    watched = report.get("leakage_during_training")
    if watched:
        steps = ", ".join(f"{c['step']}: {c['pixel_permutation']:.0%}" for c in watched["curve"])
        lines.append(f"\nweight matching while training {watched['config']} (step: pixels recovered): {steps}")
    for name, score in report.get("weights", {}).items():
        if "pixel_permutation" not in score:  # a mixing's adapter: the embedding attack (attacks/audit.py)
            lines.append(
                f"\nembedding attack, {name} (its trained patch embedding against the public one): held-out images "
                f"decrypted at {score['held_out_psnr_db']:.1f} dB, SSIM {score['held_out_ssim']:.3f}"
            )
            continue
        b = score["block_permutation"]
        lines.append(
            f"\nweight matching, {name}: pixel permutation {score['pixel_permutation']:.1%}"
            + ("" if b is None else f", block permutation {b:.1%}")
        )
    return "\n".join(lines)


def _format_ciphertext_only(co: dict[str, Any]) -> str:
    """One line per scheme and N: keys exact, keys readable and as what, mean share, PSNR, SSIM, time."""
    if co.get("attacked") == "stored":
        return _format_stored(co)
    lines = [
        f"ciphertext-only key recovery at {co['size']}x{co['size']}, {co['block_size']}x{co['block_size']} blocks, "
        f"{co['resize']} resize, {len(co['key_fingerprints'])} key(s) ({co['keys']}), "
        f"{co['held_out_images']} held-out images; plain images encrypted here (simulated uploads)",
        f"{'scheme':<40} {'N':>5} {'exact':>7} {'readable':>8}  {'as what':<16} {'plan right':>10} "
        f"{'PSNR dB':>8} {'SSIM':>6} {'s/key':>6}",
    ]
    for s in co["schemes"]:
        if s["status"] != "attacked":
            lines.append(f"{s['scheme']:<40} {s['status']}")
            continue
        for r in s["summary"]:
            k = r["keys"]
            what = ", ".join(f"{count} {word}" for word, count in r["readable_as"].items()) or "-"
            lines.append(
                f"{s['scheme']:<40} {r['n']:>5} {r['keys_exact']:>5}/{k} {r['keys_readable']:>6}/{k}  {what:<16} "
                f"{r['mean_exact']:>10.3f} {r['median_psnr_db']:>8.1f} {r['mean_ssim']:>6.3f} {r['mean_seconds']:>6.1f}"
            )
    lines.append(
        "readable: keys whose plan decrypts every image exactly, or up to what no ciphertext shows: mirrored (the "
        "whole image left-right, as readable as the original, though its PSNR against the original is low) or "
        "blocks turned (every block the same way in place). Exact or mirrored at one N is chance, not a trend."
    )
    return "\n".join(lines)


def _format_stored(co: dict[str, Any]) -> str:
    """The attack on a user's stored ciphertexts: per N, the readability proxy, and with the key the verdict."""
    lines = [
        f"ciphertext-only attack on the ciphertexts as stored in {co['data']} ({co['format']}, {co['scheme']}, "
        f"{co['size']}x{co['size']}, {co['block_size']}x{co['block_size']} blocks, key {co['key_fingerprint']}): "
        f"{co['ciphertexts']} ciphertexts, {co['held_out_images']} held out; the attack used no key"
    ]
    if co["status"] != "attacked":
        return "\n".join([*lines, f"  {co['status']}"])
    if "mixing" in co:
        return "\n".join([*lines, *_stored_mixing(co)])
    lines.append(f"  the attack guesses the key's whole plan: {'; '.join(co['plan_parts'])}")
    for r in co["runs"]:
        lines.append(
            f"  N={r['n']}: plan recovered in {r['seconds']:.1f} s; held-out ciphertexts decrypted with it are "
            + _readability(r, co)
        )
        if "verdict" in r:
            lines.append(
                f"  N={r['n']}: {r['verdict']} (--key); against the true decryption PSNR {r['psnr_db']:.1f} dB, "
                f"SSIM {r['ssim']:.3f}; {r['exact']:.1%} of the plan exact"
            )
    if "image flip" in co["unresolved"]:
        lines.append(
            "  no ciphertext shows a left-right mirror of the whole image once blocks are scrambled: a recovered "
            "image may be the mirror image, as readable as the original"
        )
    n = co["runs"][-1]["n"]
    lines.append(
        f"  look at them: {RECOVERED}/ (beside audit.json) holds the held-out ciphertexts decrypted with the plan "
        f"from N={n}"
    )
    return "\n".join(lines)


def _stored_mixing(co: dict[str, Any]) -> list[str]:
    """A mixing's lines: per N, the decryptions' roughness against the prior's, and with the key PSNR/SSIM
    beside the block-mean thumbnail's."""
    lines = [
        f"  the attack estimates {co['plan_parts'][0]}, from the ciphertexts and {co['prior_images']} plain public "
        f"images of {co['prior']}, {co['prior_read_from']} (the prior)"
    ]
    for r in co["runs"]:
        rough, prior = r["roughness"], co["prior_roughness"]
        # measured (uploaded_mixing): decryptions fitted to the prior at 0.97-1.1x its roughness, a random matching 1.6x
        if rough > 1.3 * prior:
            words = "rougher than the prior's images: not photograph-like"
        elif rough < 0.5 * prior:
            words = "far smoother than the prior's images: blurred, block means at most"
        else:
            words = "as smooth as the prior's images: photograph-like, possibly readable"
        lines.append(
            f"  N={r['n']}: decryptor in {r['seconds']:.1f} s; held-out ciphertexts decrypted with it are {words} "
            f"(neighbouring values differ by {rough:.1f} on average, {prior:.1f} in the prior, "
            f"{co['stored_roughness']:.1f} as stored; roughness cannot tell a right decryption from a plausible "
            "wrong one)"
        )
        if "psnr_db" in r:
            side = "above" if r["psnr_db"] > co["thumbnail_psnr_db"] else "not above"
            lines.append(
                f"  N={r['n']}: against the true decryption (--key) PSNR {r['psnr_db']:.1f} dB, SSIM {r['ssim']:.3f}; "
                f"{side} what a leak of block means shows (the thumbnail: {co['thumbnail_psnr_db']:.1f} dB, SSIM "
                f"{co['thumbnail_ssim']:.3f})"
            )
    if co["unresolved"]:
        lines.append(
            f"  left as they are (one matrix for every block does not undo them): {', '.join(co['unresolved'])}"
        )
    lines.append(
        f"  look at them: {RECOVERED}/ (beside audit.json) holds the held-out ciphertexts decrypted from "
        f"N={co['runs'][-1]['n']}"
    )
    return lines


def _readability(run: dict[str, Any], co: dict[str, Any]) -> str:
    """The readability proxy of one run in words: the decryptions' roughness against random plans'."""
    random = co["random_plan_roughness"]
    r, lo, hi = run["roughness"], min(random), max(random)
    figures = (
        f"neighbouring values differ by {r:.1f} on average, {lo:.1f}-{hi:.1f} under {len(random)} random plans, "
        f"{co['stored_roughness']:.1f} as stored"
    )
    if r < 0.5 * lo:
        return f"far smoother than every random plan of the scheme ({figures}): photograph-like, likely readable"
    if r < lo:
        return f"smoother than every random plan of the scheme ({figures}): partly recovered"
    return f"no smoother than random plans of the scheme ({figures}): nothing recovered"
