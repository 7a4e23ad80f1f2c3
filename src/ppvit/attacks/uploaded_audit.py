"""``ppvit audit --ciphertext-only N --data ENCRYPTED``: the ciphertexts a user uploaded, attacked as they are.

The question a user brings to the audit is what the server can do with what it holds. Encrypted
data (``ppvit encrypt`` output in any format, or a server's stored dataset in the same layout: both
carry a manifest) is attacked as stored and never encrypted again: scheme and block size from the
manifest, the key's plan recovered from N ciphertexts with no key
(:func:`~ppvit.attacks.ciphertext_only.recover_plan`), held-out ciphertexts decrypted with it and
written for the user to look at. A dense mixing's (``mix``, ``lift``) key is a matrix, found from the
ciphertexts and plain public images of the same kind (``prior``) by
:mod:`~ppvit.attacks.uploaded_mixing`. Without the key, a readability proxy says how photograph-like the
decryptions are: their :func:`~ppvit.attacks.metrics.roughness` against that of random plans of the
scheme. With the key, the recovered plan is scored against the true one
(:func:`~ppvit.attacks.ciphertext_only_audit.score_recovery`): exact, up to a symmetry (and what
that costs the user), or not. Plain images go to
:func:`~ppvit.attacks.ciphertext_only_audit.ciphertext_only_audit` instead, which simulates keys.
Reports hold scores, paths and fingerprints, never a key or a recovered plan.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ppvit.attacks.ciphertext_only import recover_plan, unsupported
from ppvit.attacks.ciphertext_only_audit import readable_as, score_recovery, symmetries, verdict
from ppvit.attacks.metrics import roughness
from ppvit.attacks.report import RECOVERED, SHOWN, check_out, write_recovered, write_report
from ppvit.attacks.uploaded_mixing import attack_stored_mixing, check_prior, read_prior
from ppvit.crypto.keys import Key
from ppvit.data.datasets import resolve_data
from ppvit.data.manifest import MARKER, read_marker
from ppvit.data.sources import Source, SplitNames, decode, open_source

log = logging.getLogger(__name__)


@dataclass
class UploadedConfig:
    """How ``ppvit audit --ciphertext-only`` attacks stored ciphertexts (beside the Ns)."""

    images: int = 8  # held-out ciphertexts decrypted with the recovered plan and written out
    seed: int = 0  # the choice of ciphertexts and the attack's generator
    random_plans: int = 8  # random plans of the scheme the readability proxy compares with
    prior: str | None = None  # mix/lift: plain public images of the same kind (any source ppvit reads)
    prior_images: int = 2000  # at most this many prior images are read: memory stays bounded

    def __post_init__(self) -> None:
        if self.prior_images < 1:
            raise ValueError(f"--prior-images: expected a positive number of images, got {self.prior_images}")


def stored_ciphertexts(data: str | os.PathLike | None, splits: SplitNames | None = None) -> Source | None:
    """The encrypted dataset ``data`` names (a manifest with a scheme), or None for plain images
    (no manifest, or ``ppvit decrypt`` output): ciphertext is never taken for plain images. ``splits`` are
    checked as every source checks them: a manifest's dataset refuses them (the stored audit draws from
    every split as stored, so a choice of two could not apply)."""
    source = open_source(resolve_data(data), splits=splits)
    return source if source.encrypted else None


def read_ciphertexts(source: Source, n: int, seed: int = 0) -> tuple[list[str], np.ndarray, int]:
    """``n`` ciphertexts of ``source`` in a fixed random choice over every split, as stored (NHWC uint8,
    never resized), with their relative paths and the number the source holds. A PNG whose
    :data:`~ppvit.data.manifest.MARKER` chunk names another key or geometry than the manifest is refused, as
    ``predict`` refuses it (a folder holding two keys' ciphertexts was attacked and scored as one key's)."""
    m = source.manifest
    rels = sorted(source.paths())
    if len(rels) < n:
        raise ValueError(
            f"encrypted dataset {source.path}: {len(rels)} ciphertexts, {n} needed (the largest N to attack plus "
            "the held-out ones, --images)"
        )
    chosen = [rels[i] for i in np.random.default_rng(seed).permutation(len(rels))[:n]]
    where = {rel: k for k, rel in enumerate(chosen)}
    images: list[np.ndarray | None] = [None] * n
    for rel, data in source.items(lambda r: r in where):
        if isinstance(data, np.ndarray):  # npz shards: the stored values (a mixing's float16 or integers)
            images[where[rel]] = data
            continue
        item = decode(rel, data)
        if item.image is None:
            raise ValueError(f"encrypted dataset {source.path}: {rel}: {item.error}")
        stated = item.image.info.get(MARKER)
        if isinstance(stated, str):  # npz shards and unmarked files state nothing
            file = f"encrypted dataset {source.path}: {rel}"
            marked = read_marker(stated, file)
            marked.check(m.scheme, m.block_size, m.size, m.key_fingerprint, f"{file}: ciphertext of another dataset")
        images[where[rel]] = np.asarray(item.image)
    shapes = sorted({im.shape for im in images if im is not None})
    if len(shapes) != 1:
        raise ValueError(f"encrypted dataset {source.path}: ciphertexts of shapes {shapes}; expected one size")
    return chosen, np.stack(images), len(rels)  # type: ignore[arg-type]


def audit_uploaded(
    source: Source,
    ns: Sequence[int],
    cfg: UploadedConfig,
    key: Key | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Recover the key's plan from N of ``source``'s ciphertexts per N, decrypt ``cfg.images`` others.

    ``source``: an encrypted dataset (:func:`stored_ciphertexts`). The attackers' ciphertexts and the
    held-out ones are disjoint, a fixed random choice over all splits. With ``key`` (checked against
    the manifest's fingerprint) each recovered plan is scored against the true one. With ``out``,
    writes ``audit.json`` (the report under ``"ciphertext_only"``), ``ciphertext-only.png`` and
    ``recovered/``: the held-out ciphertexts decrypted with the plan from the largest N, as PNGs
    under their paths in the dataset (nothing else is left there). A ``mix``/``lift`` dataset needs
    ``cfg.prior`` (:func:`~ppvit.attacks.uploaded_mixing.attack_stored_mixing`). An ``out`` holding other
    files than an earlier audit's, or overlapping the dataset, is refused first (:func:`check_out`).
    """
    m = source.manifest
    assert m is not None, "stored_ciphertexts gives encrypted datasets only"
    if out is not None:
        check_out(out, source.path)
    ns = sorted(set(ns))
    mixing = _check_request(source, ns, cfg, key)
    log.info(
        "%s: ciphertexts as stored (`ppvit encrypt` output, %s: %s, %dx%d blocks, key %s): attacked as they are, "
        "without the key",
        source.path,
        m.format,
        m.scheme,
        m.block_size,
        m.block_size,
        m.key_fingerprint,
    )
    paths, images, total = read_ciphertexts(source, max(ns) + cfg.images, cfg.seed)
    attack, held, held_paths = images[: max(ns)], images[max(ns) :], paths[max(ns) :]
    p, shape = m.block_size, images.shape[1:]
    if mixing and shape[0] != shape[1]:
        raise ValueError(f"encrypted dataset {source.path}: {shape[1]}x{shape[0]} ciphertexts; a prior is square")
    why = None if mixing else unsupported(m.scheme)
    co: dict[str, Any] = {
        "attacked": "stored",  # the ciphertexts as the user uploaded them; "simulated": plain images encrypted here
        "data": str(source.path),
        "format": m.format,
        "scheme": m.scheme,
        "block_size": p,
        "size": shape[0],
        "key_fingerprint": m.key_fingerprint,
        "key_given": key is not None,
        "ciphertexts": total,
        "attack_images": max(ns),
        "held_out_images": len(held),
        "held_out": held_paths,
        "status": f"not attacked: {why}" if why else "attacked",
        "stored_roughness": roughness(held),
    }
    if mixing:
        prior = read_prior(cfg.prior, cfg.prior_images, shape[0], p)  # type: ignore[arg-type]
        found, figures, decrypted = attack_stored_mixing(attack, held, m.scheme, p, ns, prior, key, progress)
    else:
        found, figures, decrypted = attack_stored_plans(attack, held, m.scheme, p, ns, cfg, key, progress)
    co.update(found)
    report = {"ciphertext_only": co}
    if out is not None:
        write_report(report, figures, Path(out))
        if decrypted is not None:
            write_recovered(Path(out) / RECOVERED, held_paths, decrypted)  # the last N's: the largest
    return report


def _check_request(source: Source, ns: list[int], cfg: UploadedConfig, key: Key | None) -> str | None:
    """Refuse, before anything slow, what cannot be attacked as asked; returns the scheme's mixing, if any."""
    from ppvit.crypto.ciphers import Scheme

    m = source.manifest
    if not ns or min(ns) < 1 or cfg.images < 1:
        raise ValueError(f"need positive numbers of ciphertexts and held-out images, got {list(ns)} and {cfg.images}")
    if key is not None and key.fingerprint != m.key_fingerprint:
        raise ValueError(
            f"key {key.fingerprint} did not encrypt {source.path} (its manifest names key {m.key_fingerprint})"
        )
    mixing = Scheme.parse(m.scheme).mixing
    if mixing and cfg.prior is None:
        raise ValueError(
            f"encrypted dataset {source.path}: {m.dtype} ciphertext of scheme {m.scheme}; a mixing's attack needs "
            "plain public images of the same kind: --prior PLAIN"
        )
    if not mixing and cfg.prior is not None:
        raise ValueError(f"encrypted dataset {source.path}: scheme {m.scheme}; --prior is for mix/lift ciphertext")
    if mixing:
        check_prior(cfg.prior)  # type: ignore[arg-type]
    return mixing


def attack_stored_plans(
    attack: np.ndarray,
    held: np.ndarray,
    scheme: str,
    p: int,
    ns: Sequence[int],
    cfg: UploadedConfig,
    key: Key | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], np.ndarray | None]:
    """Per N, the plan recovered from ``attack[:N]`` and ``held`` decrypted with it (scored with ``key``):
    the report's fields, the figure's rows, and the decryptions of the largest N (None: not attacked)."""
    from ppvit.crypto.ciphers import compile_plan

    shape = held.shape[1:]
    co: dict[str, Any] = {
        "plan_parts": plan_parts(scheme, shape, p),  # what a recovered plan consists of
        # what no ciphertext shows, so a recovered image may differ from the original by it
        "unresolved": [s for s in symmetries(scheme, shape, p) if not s.startswith("block ")],
        "random_plan_roughness": [],
        "runs": [],
    }
    figures: dict[str, dict[str, np.ndarray]] = {}
    if unsupported(scheme):
        return co, figures, None
    co["random_plan_roughness"] = random_plan_roughness(held, scheme, p, cfg.random_plans, cfg.seed)
    truth = compile_plan(key, scheme, p, shape) if key is not None else None
    plain = None if truth is None else truth.inverse().apply_numpy(held)
    for n in tqdm(ns, desc="ciphertext-only attack", unit="N", disable=not progress):
        t0 = time.perf_counter()
        guess = recover_plan(attack[:n], scheme, p, seed=np.random.default_rng(cfg.seed))
        run: dict[str, Any] = {"n": n, "seconds": time.perf_counter() - t0}
        decrypted = guess.inverse().apply_numpy(held)
        run["roughness"] = roughness(decrypted)
        row = {"stored ciphertexts": held[:SHOWN], f"decrypted, plan from {n}": decrypted[:SHOWN]}
        if truth is not None:
            score = score_recovery(guess, truth, scheme, p, plain)
            run.update(dataclasses.asdict(score), readable_as=readable_as(score), verdict=verdict(score, p))
            run["true_roughness"] = roughness(plain)
            row["true decryption (--key)"] = plain[:SHOWN]
        co["runs"].append(run)
        figures[f"N={n}"] = row
    return co, figures, decrypted


def random_plan_roughness(ciphertexts: np.ndarray, scheme: str, p: int, draws: int, seed: int) -> list[float]:
    """:func:`roughness` of ``ciphertexts`` decrypted with ``draws`` random plans of ``scheme``: what a
    plan that recovered nothing gives, the yardstick of the readability proxy."""
    from ppvit.crypto.ciphers import compile_plan

    rng = np.random.default_rng([seed, 1])
    plans = (compile_plan(Key(rng.bytes(32)), scheme, p, ciphertexts.shape[1:]) for _ in range(draws))
    return [roughness(plan.inverse().apply_numpy(ciphertexts)) for plan in plans]


def plan_parts(scheme: str, shape: tuple[int, int, int], p: int) -> list[str]:
    """What the plan of ``scheme`` is made of at ``shape``: what the attack guesses, in words."""
    from ppvit.crypto.ciphers import Scheme

    blocks, values = shape[0] * shape[1] // p**2, p * p * shape[2]
    words = {
        "shuffle": f"the permutation of the {values} values of a block (one for all blocks)",
        "scramble": f"the order of the {blocks} blocks",
        "rotate": "each block position's rotation or flip",
        "negpos": "each block position's negation",
        "channel": "each block position's colour order",
    }
    return [
        f"{s}: a choice per value position inside a block, one for all blocks"
        if s.mode == "pixel"
        else words.get(s.name, str(s))
        for s in Scheme.parse(scheme).steps
    ]
