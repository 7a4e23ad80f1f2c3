"""The per-block steps (``rotate``, and ``channel`` and ``negpos`` in ``:block`` mode): every block position
aligned to one reference block, so that one shared map remains for :func:`ppvit.attacks.ciphertext_only.recover_plan`.

Pooled per position across images, each block's value correlations, turned back by the right rotation
and channel order, match the others', and a negated block's brightness and gradients anti-correlate
with its neighbours'.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from ppvit.attacks.metrics import plan_from_maps, to_blocks
from ppvit.attacks.orientation import dihedral_index

if TYPE_CHECKING:
    from ppvit.crypto.ciphers import Plan


def block_group(p: int, c: int, rotate: bool, channel: bool) -> np.ndarray:
    """(G, p*p*c) gather indexes inside a block: the 8 rotations/flips of its cells (``rotate``)
    times the ``c!`` orders of its channels (``channel``), the identity first. A group: the
    relative choice between any two blocks is one of its members."""
    turns = [dihedral_index(p, k) for k in (range(8) if rotate else [0])]
    orders = list(itertools.permutations(range(c))) if channel else [tuple(range(c))]
    return np.array([(d[:, None] * c + np.array(o)[None, :]).ravel() for d in turns for o in orders])


def align_blocks(
    ciphertexts: np.ndarray, p: int, rotate: bool, channel: bool, negate: bool, max_images: int = 128
) -> Plan:
    """A plan that turns every ciphertext block into what the reference block's keyed choices would
    have made of it, so that all blocks share one map (the shuffle with the reference's choices).

    Each block position has its own keyed rotation, channel order and negation, the same in every
    image. Negation: the brightness of all blocks of an image rises and falls together, so a negated
    block's mean correlates negatively with the others across images (the sign of the leading
    eigenvector of that correlation matrix). Rotations and channel orders permute the ciphertext
    positions of a block: the correlation matrix of a block's values across images, turned back by
    the right member of :func:`block_group`, matches the other blocks'; each block takes the member
    that matches a template best, the template is re-estimated from the aligned blocks, repeatedly.
    The absolute choices (the reference's) and the sign of all blocks at once remain unknown here.
    """
    shape = ciphertexts.shape[1:]
    c = shape[2]
    blocks = to_blocks(ciphertexts, p)  # (N, B, L) uint8
    nb, length = blocks.shape[1:]
    group = block_group(p, c, rotate, channel)
    choice = np.zeros(nb, dtype=np.int64)
    if len(group) > 1:
        choice = match_block_maps(blocks[:max_images], group)  # blind to negation
    pi = group[choice]
    flip = np.zeros(nb, dtype=bool)
    if negate:
        flip = negated_blocks(np.take_along_axis(blocks[:max_images], pi[None], axis=2))
    return plan_from_maps(shape, p, np.arange(nb), pi, np.broadcast_to(flip[:, None], (nb, length)))


def negated_blocks(blocks: np.ndarray, components: int = 32, sweeps: int = 10) -> np.ndarray:
    """(B,) True for the blocks negated relative to block 0, from (N, B, L) ciphertext blocks that
    share one within-block map.

    Neighbouring blocks of a photograph share its brightness and its gradients: across images,
    their means and their detail (the block less its mean, on the leading principal components
    of all blocks' detail) correlate positively, negatively when one of them is negated. Signs
    spread from block 0 along the strongest correlations (a maximum spanning tree), then each
    block takes the sign most of the others' weighted votes give it, a few sweeps.
    """
    from scipy.sparse.csgraph import minimum_spanning_tree

    n, nb, length = blocks.shape
    if n < 2:
        return np.zeros(nb, dtype=bool)
    x = blocks.astype(np.float64)
    means = x.mean(-1)  # (N, B)
    detail = x - means[..., None]
    detail -= detail.mean(0)  # per block position: a negated block's detail is exactly minus the plain one
    pooled = detail.reshape(-1, length)
    _, _, vt = np.linalg.svd(pooled[:: max(1, len(pooled) // 4096)], full_matrices=False)
    f = detail @ vt[:components].T  # (N, B, k)
    f /= np.maximum(np.sqrt((f**2).sum((0, 2), keepdims=True)), 1e-9)
    z = means - means.mean(0)
    z /= np.maximum(np.sqrt((z**2).sum(0)), 1e-9)
    weights = z.T @ z + np.einsum("nak,nbk->ab", f, f)
    np.fill_diagonal(weights, 0)
    tree = minimum_spanning_tree(-np.abs(weights) - 1e-12).toarray()
    tree = (tree != 0) | (tree.T != 0)
    sign = np.zeros(nb)
    sign[0] = 1
    frontier = [0]
    while frontier:
        a = frontier.pop()
        for b in np.flatnonzero(tree[a] & (sign == 0)):
            sign[b] = sign[a] * (1 if weights[a, b] >= 0 else -1)
            frontier.append(b)
    sign[sign == 0] = 1
    for _ in range(sweeps):
        new = np.where(weights @ sign >= 0, 1.0, -1.0)
        new *= new[0]
        if np.array_equal(new, sign):
            break
        sign = new
    return sign < 0


def match_block_maps(blocks: np.ndarray, group: np.ndarray, rounds: int = 6) -> np.ndarray:
    """(B,) index into ``group``: the member that aligns each block's value correlations with the
    others' (block 0 is the first reference), from (N, B, L) ciphertext blocks."""
    x = blocks.astype(np.float32)
    x -= x.mean(-1, keepdims=True)  # each block's own brightness out: colour and detail remain
    x -= x.mean(0)
    x /= np.maximum(x.std(0), 1e-6)
    n, nb, length = x.shape
    cov = np.empty((nb, length, length), dtype=np.float32)
    for b in range(nb):
        cov[b] = x[:, b].T @ x[:, b] / n
    flat = cov.reshape(nb, -1)
    inverse = np.argsort(group, axis=1)
    template = cov[0].copy()
    choice = np.full(nb, -1)
    for _ in range(rounds):
        turned = np.stack([template[np.ix_(q, q)].ravel() for q in inverse])  # (G, L*L)
        new = (flat @ turned.T).argmax(1)
        if np.array_equal(new, choice):
            break
        choice = new
        template = np.mean([cov[b][np.ix_(group[g], group[g])] for b, g in enumerate(choice)], axis=0)
    return choice
