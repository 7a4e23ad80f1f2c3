"""Ciphertext-only key recovery for ``shuffle``, ``scramble`` and the per-block steps: the key from images alone.

``shuffle`` applies one permutation to the ``p*p*C`` values of every block of every image
(:mod:`ppvit.crypto.ciphers`). Every encrypted block is then a sample of the same scrambled vector,
and the statistics of natural images give the permutation away without a single plaintext:

1. *Pixels and channels.* In upscaled (smooth) images: averaged over many blocks, a value
   position's mean is its channel's mean in that image, so positions cluster by channel
   (:func:`channel_candidates`); with each block's channel means removed, the channels of one
   pixel share their spatial detail, and an assignment pairs them (:func:`pixel_triplets`).
   In native-resolution images: a value depends on the rest of its block mostly through
   its pixel-mates and its four neighbours, so pixels are the triangles of the partial
   correlation graph (:func:`triplets_by_partial_correlation`). Both are tried; the one
   whose laid-out blocks are smoothest wins (:func:`recover_pixel_map`).
2. *Layout.* Nearby pixels correlate more than distant ones: the pixels are assigned to the
   ``p x p`` cells by graduated assignment and by a spectral embedding of the partial
   correlation graph, then refined by moves and swaps that agree best with a
   correlation-by-offset template (:func:`~ppvit.attacks.pixel_layout.layout_pixels`). This is right only up to the 8
   rotations/flips of the block, which cannot be seen from inside one block.
3. *Orientation.* Of those 8, the right one makes neighbouring blocks of the same image
   meet smoothly (:func:`orient_blocks`).
4. *Colours.* Which channel is which: green correlates most with the other two; red and
   blue come from a natural-image prior (:func:`~ppvit.attacks.orientation.natural_score`).

For ``scramble`` (block positions permuted, the same way in every image) steps 1-2 are
unchanged (they never look at where a block is); then a jigsaw over block edges, summed
over all images, puts the blocks back (:func:`~ppvit.attacks.jigsaw.solve_jigsaw`). The result is right up to a
rotation or flip of the whole image: the rotation is chosen by the same natural-image
prior (light and blue at the top), the left-right mirror cannot be told from ciphertexts
and a mirror-symmetric prior, so it stays as found
(:func:`~ppvit.attacks.ciphertext_only_audit.score_recovery` forgives it).

The per-block steps (``rotate``, and ``channel`` and ``negpos`` in ``:block`` mode) give each
block position its own choice, the same in every image: pooled per position across images,
each block's value correlations, turned back by the right rotation and channel order, match
the others', and a negated block's brightness and gradients anti-correlate with its
neighbours' (:func:`~ppvit.attacks.block_alignment.align_blocks`). Aligned, all blocks share
one map, and the attack above recovers it; the negation of everything at once is chosen by the
natural-image prior. This needs the per-block steps after ``shuffle`` (as in ppvit's EtC order); :func:`unsupported`
says which schemes are not attacked and why.

Recovered plans are for measuring leakage (:mod:`ppvit.attacks.ciphertext_only_audit` scores them
per scheme, number of ciphertexts and key for ``ppvit audit --ciphertext-only``): callers should
report scores, not plans. All randomness comes from an explicit ``numpy.random.Generator``. The
attack is numpy; scipy and the cipher module (which imports torch) load inside the functions that
use them, so that importing this module (the CLI reads :data:`CIPHERTEXT_ONLY_SCHEMES`) stays cheap.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

from ppvit.attacks.block_alignment import align_blocks
from ppvit.attacks.jigsaw import solve_jigsaw
from ppvit.attacks.metrics import assign, plan_from_maps, roughness, to_blocks
from ppvit.attacks.orientation import chain, choose_sign, colour_order, dihedral_index, upright
from ppvit.attacks.pixel_layout import layout_pixels, partial_correlation, standardise

if TYPE_CHECKING:
    from ppvit.crypto.ciphers import Plan, Scheme

CIPHERTEXT_ONLY_SCHEMES = ("shuffle", "shuffle+scramble")  # what ppvit audit --ciphertext-only attacks by default
Seed = int | np.random.Generator | None


def unsupported(scheme: str | Scheme) -> str | None:
    """Why :func:`recover_plan` does not attack ``scheme``, or None when it does.

    Shared within-block maps (``shuffle``, ``channel:pixel``) and ``scramble`` are attacked as
    one permutation; the per-block steps (``rotate``, ``channel`` and ``negpos`` in ``:block``
    mode) by aligning every block position to one of them first
    (:func:`~ppvit.attacks.block_alignment.align_blocks`), which needs them to act on the ciphertext
    side of every shared map: after ``shuffle`` and ``channel:pixel`` (``negpos`` commutes with
    everything and may stand anywhere).
    """
    from ppvit.crypto.ciphers import Scheme

    steps = Scheme.parse(scheme).steps
    for i, s in enumerate(steps):
        if s.name == "negpos" and s.mode == "pixel":
            return "negpos:pixel (a keyed sign per value position) is not modelled by the attack"
        if s.name in ("rotate", "channel") and s.mode == "block":
            later = [
                str(t) for t in steps[i + 1 :] if t.name == "shuffle" or (t.name == "channel" and t.mode == "pixel")
            ]
            if later:
                return f"{s} before {later[0]}: the per-block choices are hidden inside the shared permutation"
    return None


def recover_plan(ciphertexts: np.ndarray, scheme: str | Scheme, block_size: int, seed: Seed = 0) -> Plan:
    """The encryption plan guessed from NHWC uint8 ciphertexts under one key (ciphertext only).

    ``scheme``: any combination of ``shuffle``, ``scramble``, ``channel:pixel`` and the per-block
    steps ``rotate``, ``negpos``, ``channel`` (``:block`` mode) that :func:`unsupported` accepts.
    Decrypt with ``plan.inverse()``. ``seed`` (or a Generator) drives the k-means restarts and
    the symmetry breaking of the graduated assignment. The attack assumes natural photographs.
    """
    from ppvit.crypto.ciphers import Scheme

    parsed = Scheme.parse(scheme)
    why = unsupported(parsed)
    if why:
        raise ValueError(f"ciphertext-only recovery does not attack {str(parsed)!r}: {why}")
    if ciphertexts.ndim != 4 or ciphertexts.dtype != np.uint8:
        raise ValueError(f"expected NHWC uint8 ciphertexts, got {ciphertexts.dtype} {ciphertexts.shape}")
    _, h, w, c = ciphertexts.shape
    p = block_size
    if p < 2 or h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the block size {p} (at least 2)")
    steps = {s.name: s for s in parsed.steps}
    rng = np.random.default_rng(seed)
    per_block = [s for s in parsed.steps if s.mode == "block" and s.name in ("rotate", "negpos", "channel")]
    if per_block:
        align = align_blocks(ciphertexts, p, "rotate" in steps, _per_block_channel(parsed), "negpos" in steps)
        aligned = align.apply_numpy(ciphertexts)
        # every block now shares one map (the reference block's choices folded into the shuffle)
        base = recover_plan(aligned, "shuffle+scramble" if "scramble" in steps else "shuffle", p, rng)
        plan = chain(align, base.inverse()).inverse()
        return choose_sign(plan, ciphertexts, scramble="scramble" in steps) if "negpos" in steps else plan
    scramble = "scramble" in steps
    shared = "shuffle" in steps or "channel" in steps  # channel:pixel here: a shared map too
    pi = np.arange(p * p * c)
    if shared:
        pi = recover_pixel_map(ciphertexts, p, rng, blocks_in_place=not scramble)
    plan = _plan((h, w, c), p, np.arange(h * w // p**2), pi)
    if not scramble:
        return plan
    sigma = solve_jigsaw(plan.inverse().apply_numpy(ciphertexts), p)
    plan = _plan((h, w, c), p, sigma, pi)
    # with shuffle, the within-block layout was found up to its 8 symmetries, so the jigsaw
    # assembled the image up to a rotation or flip: choose the upright one
    return upright(plan, ciphertexts) if shared else plan


def _per_block_channel(scheme: Scheme) -> bool:
    return any(s.name == "channel" and s.mode == "block" for s in scheme.steps)


def _plan(shape: tuple[int, int, int], p: int, sigma: np.ndarray, pi: np.ndarray) -> Plan:
    return plan_from_maps(shape, p, sigma, pi, np.zeros(pi.size, dtype=bool))


def recover_pixel_map(ciphertexts: np.ndarray, p: int, rng: np.random.Generator, blocks_in_place: bool) -> np.ndarray:
    """``pi``: encrypted value i of every block is plain value ``pi[i]`` (``shuffle``'s permutation).

    Pixels come from two methods: channel clustering for smooth images (several settings, the
    one whose pixels are most coherent), partial correlations for native ones; each is laid
    out and the layout whose decrypted blocks are smoothest wins. With ``blocks_in_place`` (no ``scramble``) the
    block orientation is then fixed by the edges between neighbouring blocks and the colours
    by the prior; otherwise the orientation is left as found (the image is turned upright later).
    """
    c = ciphertexts.shape[-1]
    samples = to_blocks(ciphertexts, p).astype(np.float64)  # (N, blocks, L)
    flat = samples.reshape(-1, samples.shape[-1])
    splits = [pixel_triplets(flat, labels, c) for labels in channel_candidates(samples, c, rng)]
    candidates = [max(splits, key=lambda t: pixel_coherence(flat, t))]
    by_partial = triplets_by_partial_correlation(flat, c)
    if by_partial is not None and not _same_grouping(by_partial, candidates[0]):
        candidates.append(by_partial)
    laid_out = [(t, layout_pixels(flat, t, p, rng)) for t in candidates]
    triplets, cells = min(laid_out, key=lambda tc: _roughness(flat, *tc, p))
    if blocks_in_place:
        cells = orient_blocks(ciphertexts, triplets, cells, p)
    images = _plan(ciphertexts.shape[1:], p, np.arange(samples.shape[1]), _pixel_map(triplets, cells, np.arange(c), p))
    order = colour_order(images.inverse().apply_numpy(ciphertexts), upright=blocks_in_place)
    return _pixel_map(triplets, cells, order, p)


def _same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two (pixels, c) groupings hold the same pixels with the same channel split."""

    def pixels(t: np.ndarray) -> set[frozenset[int]]:
        return {frozenset(r) for r in t.tolist()}

    def channels(t: np.ndarray) -> set[frozenset[int]]:
        return {frozenset(col) for col in t.T.tolist()}

    return pixels(a) == pixels(b) and channels(a) == channels(b)


def _roughness(flat: np.ndarray, triplets: np.ndarray, cells: np.ndarray, p: int) -> float:
    """Mean absolute difference between side-by-side values of one channel in the blocks as laid
    out: lowest for the right pixels and channels (a wrong channel split mixes in colour edges)."""
    c = triplets.shape[1]
    blocks = np.empty_like(flat)
    blocks[:, _pixel_map(triplets, cells, np.arange(c), p)] = flat
    return roughness(blocks.reshape(-1, p, p, c))


def _pixel_map(triplets: np.ndarray, cells: np.ndarray, order: np.ndarray, p: int) -> np.ndarray:
    """``pi`` from pixel groups (``triplets[a, j]``: the value of channel group j of pixel a), each
    pixel's cell in the block (row-major) and ``order[j]``: the colour channel of group j."""
    c = triplets.shape[1]
    pi = np.empty(triplets.size, dtype=np.int64)
    pi[triplets] = cells[:, None] * c + np.asarray(order)[None, :]
    return pi


# -- 1a. channels, in smooth images -------------------------------------------------------------------


def channel_candidates(samples: np.ndarray, c: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Ways to split the value positions into ``c`` equal channel groups, from (N, blocks, L) samples.

    Each row of features is a mean over a group of blocks of one image: where a value sits
    in the block averages out and the group's channel means remain, so the positions of one
    channel share their features. Their leading components go to a balanced k-means. How
    many blocks to average and how many components to keep depends on the images; every
    choice is returned, for :func:`pixel_coherence` to judge.
    """
    _, g, length = samples.shape
    if c == 1:
        return [np.zeros(length, dtype=np.int64)]
    found: list[np.ndarray] = []
    for group in sorted({min(16, g), g}):
        parts = np.array_split(np.arange(g), g // group)
        feats = np.concatenate([samples[:, ix].mean(1) for ix in parts])  # (N * groups, L)
        feats = feats - feats.mean(1, keepdims=True)
        u, s, _ = np.linalg.svd(feats.T, full_matrices=False)
        for k in (c - 1, c, c + 2):
            labels = balanced_kmeans(u[:, :k] * s[:k], c, rng)
            if not any(_same_split(labels, other) for other in found):
                found.append(labels)
    return found


def _same_split(a: np.ndarray, b: np.ndarray) -> bool:
    return {frozenset(np.flatnonzero(a == j)) for j in np.unique(a)} == {
        frozenset(np.flatnonzero(b == j)) for j in np.unique(b)
    }


def balanced_kmeans(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 4) -> np.ndarray:
    """k-means with clusters of exactly ``len(x) // k`` points, best of ``restarts``: Lloyd steps,
    then assignment steps that keep the sizes equal (a linear sum assignment to the centres)."""
    from scipy.optimize import linear_sum_assignment

    m = len(x)
    size = m // k
    if size * k != m:
        raise ValueError(f"{m} points do not split into {k} equal clusters")
    best, best_cost = np.zeros(m, dtype=np.int64), math.inf
    for _ in range(restarts):
        centres = x[rng.choice(m, k, replace=False)]
        for step in range(40):
            dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
            if step < 20:
                labels = dist.argmin(1)
            else:
                rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
                labels = np.empty(m, dtype=np.int64)
                labels[rows] = cols // size
            new = np.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
            if step >= 20 and np.allclose(new, centres):
                break
            centres = new
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


# -- 1b. pixels ---------------------------------------------------------------------------------------


def pixel_triplets(flat: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """(p*p, c): the value positions that make one pixel, column j from channel group j.

    Each block's channel means are removed first: what is left is spatial detail, shared
    by a pixel's channels, so the same pixel correlates clearly above its neighbours (raw
    values of smooth, upscaled images correlate at ~0.998 with the neighbours too).
    """
    groups = [np.flatnonzero(labels == j) for j in range(c)]
    z = _detail(flat, groups)
    cols = [groups[0]]
    for ix in groups[1:]:
        corr = z[:, groups[0]].T @ z[:, ix]
        cols.append(ix[assign(corr)])
    return np.stack(cols, 1)


def _detail(flat: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Standardised values less their block's mean in their channel group: spatial detail."""
    detail = flat.copy()
    for ix in groups:
        detail[:, ix] -= detail[:, ix].mean(1, keepdims=True)
    return standardise(detail)


def pixel_coherence(flat: np.ndarray, triplets: np.ndarray) -> float:
    """Mean correlation of spatial detail between a pixel's channels (columns of ``triplets``):
    near 1 for the right channels and pixels, far lower for a wrong channel split (~0.99
    against ~0.68 on CIFAR-10 at 224x224)."""
    z = _detail(flat, list(triplets.T))
    return float(np.mean([(z[:, triplets[:, 0]] * z[:, triplets[:, j]]).mean() for j in range(1, triplets.shape[1])]))


def triplets_by_partial_correlation(flat: np.ndarray, c: int) -> np.ndarray | None:
    """(p*p, c) pixel groups with one channel per column, from partial correlations alone.

    In native-resolution images a value depends on the rest of its block mostly through its
    pixel's other channels and its four neighbours in its own channel: the pixels are the
    triangles of the partial-correlation graph, and neighbouring pixels' values pair up
    channel by channel, which makes the channel labels consistent (permutation
    synchronisation). Upscaled images are too smooth for this (neighbours predict a value
    better than its pixel-mates do) and :func:`channel_candidates` serves there. None when the
    graph does not split into triangles (``c != 3``, or too few samples).
    """
    if c != 3:
        return None
    z = standardise(flat)
    pc = partial_correlation(z.T @ z / len(z), len(flat))
    groups = _triangles(pc)
    return None if groups is None else synchronise_channels(pc, groups)


def _triangles(pc: np.ndarray, k: int = 6) -> np.ndarray | None:
    """Disjoint triangles covering all values, strongest first, from each value's ``k`` best partners."""
    m = len(pc)
    s = pc.copy()
    np.fill_diagonal(s, -np.inf)
    near = np.argsort(-s, axis=1)[:, :k]
    ii, jj = np.triu_indices(k, 1)
    tri = np.sort(np.stack([np.repeat(np.arange(m), len(ii)), near[:, ii].ravel(), near[:, jj].ravel()], 1), 1)
    tri = np.unique(tri, axis=0)
    score = pc[tri[:, 0], tri[:, 1]] + pc[tri[:, 0], tri[:, 2]] + pc[tri[:, 1], tri[:, 2]]
    used = np.zeros(m, dtype=bool)
    chosen = []
    for t in tri[np.argsort(-score, kind="stable")]:
        if not used[t].any():
            used[t] = True
            chosen.append(t)
    return np.array(chosen) if used.all() else None


def synchronise_channels(pc: np.ndarray, groups: np.ndarray, partners: int = 4) -> np.ndarray:
    """Reorder each pixel's values so that column j is one channel everywhere.

    Each pixel and its ``partners`` strongest neighbours agree on a matching of their values
    (the permutation with the largest summed partial correlation); the leading eigenvectors
    of the block matrix of those matchings give every pixel's permutation to a common frame.
    """
    n, c = groups.shape
    perms = np.array(list(itertools.permutations(range(c))))
    blocks = pc[groups[:, :, None, None], groups[None, None, :, :]]  # [a, i, b, j]
    scores = np.stack([sum(blocks[:, i, :, q[i]] for i in range(c)) for q in perms])  # (perms, n, n)
    best, strength = scores.argmax(0), scores.max(0)
    np.fill_diagonal(strength, -np.inf)
    w = np.zeros((n * c, n * c))
    for a in range(n):
        for b in np.argsort(-strength[a])[:partners]:
            q = perms[best[a, b]]
            w[a * c + np.arange(c), b * c + q] = max(strength[a, b], 0)
    w = np.maximum(w, w.T)
    d = 1 / np.sqrt(np.maximum(w.sum(1), 1e-12))
    _, vecs = np.linalg.eigh(w * d[:, None] * d[None])
    rows = vecs[:, -c:] / np.maximum(np.linalg.norm(vecs[:, -c:], axis=1, keepdims=True), 1e-12)
    rows = rows.reshape(n, c, c)  # a common frame: one direction per channel, up to a rotation
    centres = rows[np.argmax(strength.max(1))]
    out = np.empty_like(groups)
    for _ in range(20):
        order = np.stack([assign(r @ centres.T) for r in rows])  # value i of pixel a -> channel order[a, i]
        new = np.zeros_like(centres)
        np.add.at(new, order.ravel(), rows.reshape(-1, c))
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        if np.allclose(new, centres):
            break
        centres = new
    out[np.arange(n)[:, None], order] = groups
    return out


# -- 3. orientation of the blocks (shuffle) -----------------------------------------------------------


def _turn_cells(cells: np.ndarray, p: int, k: int) -> np.ndarray:
    """Cells after applying symmetry k to the layout."""
    where = np.empty(p * p, dtype=np.int64)
    where[dihedral_index(p, k)] = np.arange(p * p)
    return where[cells]


def orient_blocks(ciphertexts: np.ndarray, triplets: np.ndarray, cells: np.ndarray, p: int) -> np.ndarray:
    """The symmetry of the layout under which neighbouring blocks of the same image meet most
    smoothly (blocks must be in place, i.e. no ``scramble``)."""
    c = triplets.shape[1]
    blocks = np.arange(ciphertexts.shape[1] * ciphertexts.shape[2] // p**2)
    best, best_cost = cells, math.inf
    for k in range(8):
        turned = _turn_cells(cells, p, k)
        plain = _plan(ciphertexts.shape[1:], p, blocks, _pixel_map(triplets, turned, np.arange(c), p))
        cost = seam_cost(plain.inverse().apply_numpy(ciphertexts), p)
        if cost < best_cost:
            best, best_cost = turned, cost
    return best


def seam_cost(images: np.ndarray, p: int) -> float:
    """Mean mismatch across the block boundaries of NHWC images: the jump across each boundary
    minus what the gradients on either side predict (smooth images continue their slope)."""
    x = images.astype(np.float64)
    total = 0.0
    for axis in (1, 2):
        at = np.arange(p, x.shape[axis], p)
        if len(at):
            before, last, first, after = (np.take(x, at + off, axis=axis) for off in (-2, -1, 0, 1))
            total += float(np.abs((first - last) - (last - before + after - first) / 2).mean())
    return total
