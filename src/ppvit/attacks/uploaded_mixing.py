"""The uploaded audit's attack on ``mix``/``lift`` ciphertext: the key's matrix from N stored ciphertexts.

A mixing's key is a dense matrix on every block, not a plan, so the permutation attack of
:mod:`ppvit.attacks.uploaded_audit` does not apply. Its ciphertext-only attack
(:func:`~ppvit.attacks.block_mixing.ica_search_attack`) matches the block statistics of the
ciphertexts with those of plain images of the same kind: the *public prior*, what any attacker knows
of what photographs look like (``ppvit audit --prior PLAIN``: a CIFAR-10 copy, a folder, ...).
Per N, the statistics of the first N stored ciphertexts give a decryptor; the held-out ciphertexts
are decrypted with it. Without the key a readability proxy compares the decryptions' roughness with
the prior's; with it, PSNR/SSIM against the true decryption, beside the block-mean thumbnail's
(what a scheme leaking block means shows for free). Nothing returned holds the key or a matrix.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ppvit.attacks.block_mixing import BlockStats, eight_bit, ica_search_attack, thumbnail
from ppvit.attacks.metrics import psnr, roughness, ssim
from ppvit.attacks.report import SHOWN, Figures
from ppvit.crypto.keys import Key

BATCH = 64  # images per BlockStats update: float64 blocks of 64 images at 224 px are 77 MB, not the whole set's GBs


@dataclass(frozen=True)
class Prior:
    """What the attacker takes from the public images: their block statistics and roughness."""

    data: str
    images: int
    stats: BlockStats
    roughness: float
    read_from: str  # which part of ``data`` (the report says it: a prior holding the uploads flatters the attack)


def check_prior(data: str | os.PathLike) -> None:
    """Refuse a prior that is ciphertext (it would be taken as plain images): before anything slow."""
    from ppvit.data.datasets import resolve_data
    from ppvit.data.sources import open_source

    if open_source(resolve_data(data)).encrypted:
        raise ValueError(f"--prior {data}: ciphertext (`ppvit encrypt` output); the prior is plain public images")


def read_prior(data: str | os.PathLike, n: int, size: int, p: int, seed: int = 0) -> Prior:
    """At most ``n`` plain images of ``data``, a random choice from outside its test split if it has one
    (the one rule, :func:`~ppvit.data.datasets.find_test_split`: audits encrypt test images, so a prior
    of the same dataset does not hold them) else from all of it, as block statistics of
    ``p x p`` blocks. Only the chosen images are decoded, each resized to ``size`` by the one resize and
    added ``BATCH`` at a time: memory holds a batch, however large the source."""
    from ppvit.data.datasets import find_test_split, resolve_data
    from ppvit.data.images import resize_array
    from ppvit.data.sources import decode, open_source

    source = open_source(resolve_data(data))
    test = find_test_split(source, size)
    rels = sorted(source.paths(None if test is None else lambda rel: not rel.startswith(f"{test}/")))
    chosen = {rels[i] for i in np.random.default_rng(seed).permutation(len(rels))[:n]}

    def resized() -> Iterator[np.ndarray]:
        for rel, raw in source.items(lambda rel: rel in chosen):
            item = decode(rel, raw)
            if item.image is None:
                raise ValueError(f"--prior {data}: {rel}: {item.error}")
            yield resize_array(np.asarray(item.image), size)

    stats, rough, count, images = BlockStats(p), 0.0, 0, resized()
    while batch := list(itertools.islice(images, BATCH)):
        stacked = np.stack(batch)
        stats.add(stacked, seed=count)
        rough += roughness(stacked) * len(stacked)  # every image one shape: the weighted mean is the whole set's
        count += len(stacked)
    if count == 0:
        raise ValueError(f"--prior {data}: no images")
    part = "all of it" if test is None else f"outside its test split ({test}/)"
    return Prior(str(data), count, stats, rough / count, part)


def attack_stored_mixing(
    attack: np.ndarray,
    held: np.ndarray,
    scheme: str,
    p: int,
    ns: Sequence[int],
    prior: Prior,
    key: Key | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], Figures, np.ndarray]:
    """Per N (ascending), the decryptor from ``attack[:N]`` and the prior, applied to ``held``.

    Returns the report's fields (no key, no matrix), the figure's rows, and the held-out images
    decrypted with the decryptor of the largest N.
    """
    from ppvit.crypto.ciphers import BlockCipher, Scheme

    parsed = Scheme.parse(scheme)
    values = p * p * held.shape[-1]
    co: dict[str, Any] = {
        "mixing": parsed.mixing,
        "plan_parts": [f"the key's matrix: one dense map of the {values} values of a block, the same for every block"],
        # one matrix for every block absorbs the steps that are the same for every block, not the others
        "unresolved": [str(s) for s in parsed.gather.steps if s.name != "shuffle" and s.mode != "pixel"],
        "prior": prior.data,
        "prior_images": prior.images,
        "prior_read_from": prior.read_from,
        # The readability proxy's yardstick is the prior's roughness, not a random key's decryption:
        # measured on CIFAR-10 (32x32, 4x4 blocks, 392 ciphertexts, 1000 prior images) the plain images
        # have 14.3, the prior 15.1, the attack's decryptions 14.6 (mix) and 16.8 (lift), a random
        # matching in the attack's own whitened form 24, and a random key's inverse 58 (mix) and 131
        # (lift): every linear decryption fitted to the prior is far smoother than a random key's, so
        # that yardstick would call anything recovered; closeness to the prior's is what tells.
        "prior_roughness": prior.roughness,
        "runs": [],
    }
    plain = None if key is None else BlockCipher(key, scheme, p).decrypt(held)
    if plain is not None:
        thumb = thumbnail(plain, p)  # the reference: what a leak of the block means shows
        co.update(
            true_roughness=roughness(plain), thumbnail_psnr_db=psnr(plain, thumb), thumbnail_ssim=ssim(plain, thumb)
        )
    figures: Figures = {}
    seen, done = BlockStats(p), 0
    for n in tqdm(sorted(ns), desc="ciphertext-only attack", unit="N", disable=not progress):
        t0 = time.perf_counter()
        for start in range(done, n, BATCH):  # the statistics grow with N: each ciphertext is read once
            seen.add(attack[start : min(start + BATCH, n)], seed=start)
        done = n
        decrypted = ica_search_attack(seen, prior.stats, parsed.mixing).decrypt(held, p)
        run: dict[str, Any] = {"n": n, "seconds": time.perf_counter() - t0, "roughness": roughness(decrypted)}
        row = {"stored ciphertexts (8-bit view)": eight_bit(held[:SHOWN]), f"decrypted, from {n}": decrypted[:SHOWN]}
        if plain is not None:
            run.update(psnr_db=psnr(plain, decrypted), ssim=ssim(plain, decrypted))
            row["true decryption (--key)"] = plain[:SHOWN]
            row["block-mean thumbnail (--key)"] = thumb[:SHOWN]
        co["runs"].append(run)
        figures[f"N={n}"] = row
    return co, figures, decrypted
