"""Measuring ciphertext-only key recovery: scores against the true key, and ``ppvit audit --ciphertext-only``.

A recovered plan (:func:`ppvit.attacks.ciphertext_only.recover_plan`) is scored against the plan of
the key that made the ciphertexts: exactly, and up to the symmetries no ciphertext can tell (a block's
orientation, the mirror of a scrambled image), with held-out images decrypted by it, and said in a
user's words (:func:`verdict`: a mirror image is as readable as the original). The audit of plain
images encrypts them under keys made for it and runs the attack per scheme, number of ciphertexts and
key; a user's own ciphertexts are attacked as stored by :mod:`ppvit.attacks.uploaded_audit`. Both
report the scores, never the plans. Apart from the attack because it needs the key; numpy like it
(the cipher module is imported where plans are made).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ppvit.attacks.ciphertext_only import recover_plan, unsupported
from ppvit.attacks.metrics import plan_accuracy, psnr, ssim, upscale
from ppvit.attacks.orientation import DIHEDRAL_NAMES, block_symmetry_index, image_symmetry_index, then
from ppvit.attacks.report import check_out, write_report
from ppvit.crypto.keys import Key

if TYPE_CHECKING:
    from ppvit.crypto.ciphers import Plan, Scheme


@dataclass(frozen=True)
class RecoveryScore:
    """How well a recovered plan matches the key's: fractions of values in [0, 1], images in dB."""

    exact: float  # share of values whose source the guess gets right
    up_to_symmetry: float  # the best share over the symmetries ciphertexts cannot (or need not) tell
    symmetry: str  # which one: "block rot90", "image flip", ...
    psnr_db: float  # held-out images decrypted with the guess against the originals (inf: exact)
    ssim: float  # nan for images under 11 pixels
    psnr_db_up_to_symmetry: float  # against the originals under that symmetry
    up_to_colours: float  # the best share when, besides, any order of the channels is forgiven


def symmetries(scheme: str | Scheme, shape: tuple[int, int, int], p: int) -> dict[str, np.ndarray]:
    """The symmetries a score forgives, as gather indexes: the 8 orientations of the blocks (all
    alike), and for ``scramble`` the left-right mirror of the whole image (no prior tells it)."""
    from ppvit.crypto.ciphers import Scheme

    out = {f"block {name}": block_symmetry_index(shape, p, k) for k, name in enumerate(DIHEDRAL_NAMES)}
    if any(s.name == "scramble" for s in Scheme.parse(scheme).steps):
        out["image flip"] = image_symmetry_index(shape, 4)
    return out


def score_recovery(guess: Plan, truth: Plan, scheme: str | Scheme, p: int, held_out: np.ndarray) -> RecoveryScore:
    """Score ``guess`` against ``truth`` (``compile_plan`` of the key), decrypting ``held_out``
    (NHWC uint8 plain images the attacker never saw) encrypted with the truth."""
    shape = truth.shape
    forgiven = symmetries(scheme, shape, p)
    fits = {name: plan_accuracy(guess, then(truth, ix)) for name, ix in forgiven.items()}
    name = max(fits, key=lambda k: (fits[k], k == "block identity"))
    channels = np.arange(math.prod(shape)).reshape(shape)
    recoloured = [
        plan_accuracy(guess, then(then(truth, ix), channels[..., list(order)].reshape(-1)))
        for ix in forgiven.values()
        for order in itertools.permutations(range(shape[2]))
    ]
    decrypted = guess.inverse().apply_numpy(truth.apply_numpy(held_out))
    turned = held_out.reshape(len(held_out), -1)[:, forgiven[name]].reshape(held_out.shape)
    return RecoveryScore(
        exact=plan_accuracy(guess, truth),
        up_to_symmetry=fits[name],
        symmetry=name,
        psnr_db=psnr(held_out, decrypted),
        ssim=ssim(held_out, decrypted) if min(shape[:2]) >= 11 else math.nan,  # an 11x11 window
        psnr_db_up_to_symmetry=psnr(turned, decrypted),
        up_to_colours=max(recoloured),
    )


def readable_as(score: RecoveryScore) -> str | None:
    """What the images decrypted with a recovered plan are, in a word or two; None: not readable.

    "Up to a symmetry" is what no ciphertext can show: a left-right mirror of the whole image once
    blocks are scrambled (the mirror image, as readable as the original), or every block turned the
    same way in place; a user should read it as "readable", not as a partial failure.
    """
    if score.exact == 1.0:
        return "exact"
    if score.up_to_symmetry == 1.0:
        return "mirrored" if score.symmetry == "image flip" else f"blocks {score.symmetry.removeprefix('block ')}"
    return "colours swapped" if score.up_to_colours == 1.0 else None


def verdict(score: RecoveryScore, p: int) -> str:
    """A recovered plan against the true one, and what it costs the user, in one sentence."""
    word = readable_as(score)
    if word == "exact":
        return "exact"
    if word == "mirrored":
        return (
            "up to image flip: readable (mirrored): every image decrypts to its left-right mirror, which no "
            "ciphertext can tell from the original and which is as readable"
        )
    if word is not None and score.up_to_symmetry == 1.0:
        return (
            f"up to {score.symmetry}: readable (every {p}x{p} block turned in place, the same way): the image's "
            "layout, colours and coarse shapes show"
        )
    if word is not None:
        return "up to the colour channels: readable (colours swapped)"
    return f"not recovered: {score.exact:.0%} of the plan right ({score.up_to_symmetry:.0%} up to a symmetry)"


# -- the audit: ppvit audit --ciphertext-only -----------------------------------------------------------


@dataclass
class CiphertextOnlyConfig:
    """What ``ppvit audit --ciphertext-only`` measures (beside the schemes, Ns and keys)."""

    size: int = 224
    block_size: int = 16
    resize: str = "bicubic"  # how smaller images reach ``size``: bicubic (smooth) or nearest
    images: int = 8  # held-out images per run, decrypted with the recovered plan
    seed: int = 0  # the attack's generator (k-means restarts, symmetry breaking)
    key_source: str = "fresh"  # recorded in the report: "given", or fresh keys made for the audit


def ciphertext_only_audit(
    images: np.ndarray,
    schemes: Sequence[str],
    ns: Sequence[int],
    keys: Sequence[Key],
    cfg: CiphertextOnlyConfig,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Ciphertext-only key recovery per scheme, number of ciphertexts N and key, scored on held-out images.

    ``images``: NHWC uint8 plain images (upscaled to ``cfg.size``), a mix of classes. Key ``k``
    attacks the encryptions of images ``k*M .. k*M+N`` (``M = max(ns)``) when there are
    ``len(keys)*M`` of them besides the held-out ones, so that keys are independent trials,
    else all keys share the first ``M``; the last ``cfg.images`` are held out. A scheme
    :func:`recover_plan` does not attack is reported as ``"not attacked: <reason>"``. Keys appear
    only by fingerprint. With ``out`` (refused first if it holds other files: :func:`check_out`), writes
    ``audit.json`` (the report under ``"ciphertext_only"``) and ``ciphertext-only.png``.
    """
    from ppvit.crypto.ciphers import Scheme

    if out is not None:
        check_out(out)
    ns = sorted(set(ns))
    if not ns or min(ns) < 1:
        raise ValueError(f"numbers of ciphertexts must be positive, got {list(ns)}")
    if not keys:
        raise ValueError("no key to attack")
    if cfg.images < 1 or len(images) < max(ns) + cfg.images:
        raise ValueError(f"need {max(ns)} attack images plus {max(cfg.images, 1)} held out, got {len(images)}")
    # each key gets its own attack images while there are enough (independent trials), else they share
    own = (len(images) - cfg.images) // (max(ns) * len(keys)) > 0
    images = upscale(images, cfg.size, cfg.resize)
    held = images[len(images) - cfg.images :]
    results: list[dict[str, Any]] = []
    figures: dict[str, dict[str, np.ndarray]] = {}  # per scheme: two held-out images, side by side
    bar = tqdm(total=len(schemes) * len(ns) * len(keys), desc="ciphertext-only attacks", disable=not progress)
    for scheme in schemes:
        Scheme.parse(scheme)
        why = unsupported(scheme)
        entry: dict[str, Any] = {"scheme": scheme, "status": f"not attacked: {why}" if why else "attacked"}
        results.append(entry)
        if why:
            bar.update(len(ns) * len(keys))
            continue
        entry["runs"], entry["summary"] = [], []
        for n in ns:
            runs = []
            for k, key in enumerate(keys):
                start = k * max(ns) if own else 0
                run, figure = _attack(key, scheme, images[start : start + n], held, cfg, show=n == ns[-1] and k == 0)
                runs.append(run)
                if figure:
                    figures[scheme] = figure
                bar.set_postfix_str(f"{scheme}, N={n}")
                bar.update()
            entry["runs"] += runs
            entry["summary"].append(_summary(n, runs))
    bar.close()
    report = {
        "ciphertext_only": {
            "size": cfg.size,
            "block_size": cfg.block_size,
            "resize": cfg.resize,
            "attacked": "simulated",  # plain images encrypted under keys made here; "stored": a user's ciphertexts
            "attack_images": max(ns),
            "attack_images_per_key": "own" if own else "shared",
            "held_out_images": cfg.images,
            "keys": cfg.key_source,
            "key_fingerprints": [k.fingerprint for k in keys],
            "schemes": results,
        }
    }
    if out is not None:
        write_report(report, figures, Path(out))
    return report


def _attack(
    key: Key, scheme: str, attack: np.ndarray, held: np.ndarray, cfg: CiphertextOnlyConfig, show: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """One run: ``attack`` (plain images at ``cfg.size``) encrypted under ``key``, the plan recovered from
    them alone and scored on ``held``; with ``show``, the figure's row (two held-out images)."""
    from ppvit.crypto.ciphers import compile_plan

    p = cfg.block_size
    truth = compile_plan(key, scheme, p, attack.shape[1:])
    t0 = time.perf_counter()
    guess = recover_plan(truth.apply_numpy(attack), scheme, p, seed=np.random.default_rng(cfg.seed))
    seconds = time.perf_counter() - t0
    score = score_recovery(guess, truth, scheme, p, held)
    run = {
        "n": len(attack),
        "key_fingerprint": key.fingerprint,
        "seconds": seconds,
        **dataclasses.asdict(score),
        "readable_as": readable_as(score),
    }
    if not show:
        return run, None
    enc = truth.apply_numpy(held[:2])
    return run, {"plain": held[:2], "encrypted": enc, f"recovered from {len(attack)}": guess.inverse().apply_numpy(enc)}


def _summary(n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    psnrs = [r["psnr_db"] for r in runs]
    readable = [r["readable_as"] for r in runs if r["readable_as"] is not None]
    return {
        "n": n,
        "keys": len(runs),
        "keys_exact": sum(r["exact"] == 1.0 for r in runs),
        "keys_exact_up_to_symmetry": sum(r["up_to_symmetry"] == 1.0 for r in runs),
        "keys_readable": len(readable),
        "readable_as": {word: readable.count(word) for word in sorted(set(readable))},
        "mean_exact": float(np.mean([r["exact"] for r in runs])),
        "mean_up_to_symmetry": float(np.mean([r["up_to_symmetry"] for r in runs])),
        "median_psnr_db": float(np.median(psnrs)),
        "mean_ssim": float(np.nanmean([r["ssim"] for r in runs]))
        if not all(math.isnan(r["ssim"]) for r in runs)
        else math.nan,
        "mean_seconds": float(np.mean([r["seconds"] for r in runs])),
    }
