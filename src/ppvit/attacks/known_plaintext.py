"""The known-plaintext attack: a few plain/encrypted pairs under one key give its whole plan away.

Block-wise encryption only rearranges (and negates) pixel values, so from N pairs the attacker
recovers which block went where, the within-block map and the negated values, and then decrypts
any other image encrypted with that key. Blocks are matched by the multiset of their values (every
step keeps it, up to ``negpos``'s ``v -> max - v``), then the within-block map by counting, over all
pairs and blocks that share it, where an encrypted value equals a plain one; an assignment solver
picks the best permutation. ``ppvit audit`` measures it (:mod:`ppvit.attacks.audit`).
"""

from __future__ import annotations

import numpy as np
import torch

from ppvit.attacks.metrics import assign, plan_from_maps, to_blocks
from ppvit.crypto.ciphers import Plan, Scheme


def match_blocks(plain: np.ndarray, enc: np.ndarray, p: int, max_value: int = 255) -> np.ndarray:
    """sigma: encrypted block b holds plain block sigma[b], by the multiset of its values.

    Every ppvit step keeps a block's multiset of values except ``negpos`` (``v -> max - v``),
    so values are folded to ``min(v, max - v)`` first; the cost is the L1 distance between
    sorted folded values, summed over the pairs.
    """

    def signature(x: np.ndarray) -> torch.Tensor:
        v = to_blocks(x, p).astype(np.int16)
        v = np.minimum(v, max_value - v)
        return torch.from_numpy(np.sort(v, axis=-1).transpose(1, 0, 2).reshape(v.shape[1], -1).astype(np.float32))

    cost = torch.cdist(signature(enc), signature(plain), p=1)
    return assign((-cost).double().numpy())


def match_values(
    plain_blocks: np.ndarray, enc_blocks: np.ndarray, max_value: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """The within-block map shared by all given blocks: (pi, inv) from aligned (M, L) arrays.

    ``score[i, j]`` counts the blocks where encrypted value i equals plain value j (or its
    negation, for ``inv``); ties (flat regions) leave the assignment partly arbitrary.
    """
    e = torch.from_numpy(enc_blocks.astype(np.int16))
    pl = torch.from_numpy(plain_blocks.astype(np.int16))
    same, flipped = _count_equal(e, pl), _count_equal(e, max_value - pl)
    pi = assign(torch.maximum(same, flipped).double().numpy())
    rows = np.arange(len(pi))
    inv = (flipped[rows, pi] > same[rows, pi]).numpy()
    return pi, inv


def _count_equal(e: torch.Tensor, pl: torch.Tensor) -> torch.Tensor:
    """``out[i, j]`` = number of rows m with ``e[m, i] == pl[m, j]``, in bounded memory."""
    m, length = e.shape
    if m * length * length <= 50_000_000:
        return (e[:, :, None] == pl[:, None, :]).sum(0)
    return torch.stack([(e[:, i : i + 1] == pl).sum(0) for i in range(length)])


def known_plaintext_attack(plain: np.ndarray, enc: np.ndarray, scheme: str | Scheme, block_size: int) -> Plan:
    """The plan recovered from N plain/encrypted NHWC uint8 pairs (the scheme is public).

    Schemes that make the same within-block choice everywhere (``Scheme.absorbable``) pool
    the evidence of every block of every pair; per-block schemes (``rotate``, ``:block``
    modes) recover each block's map from its N pairs alone.
    """
    scheme, p = Scheme.parse(scheme), block_size
    if plain.shape != enc.shape or plain.dtype != np.uint8:
        raise ValueError(f"plain and encrypted images must be uint8 of one shape, got {plain.shape} / {enc.shape}")
    sigma = match_blocks(plain, enc, p) if any(s.name == "scramble" for s in scheme.steps) else None
    pb, eb = to_blocks(plain, p), to_blocks(enc, p)
    n = pb.shape[1]
    sigma = np.arange(n) if sigma is None else sigma
    pb = pb[:, sigma]  # aligned: row b of pb is the plain source of encrypted block b
    if scheme.absorbable:
        pi, inv = match_values(pb.reshape(-1, pb.shape[-1]), eb.reshape(-1, eb.shape[-1]))
    else:
        maps = [match_values(pb[:, b], eb[:, b]) for b in range(n)]
        pi, inv = np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps])
    return plan_from_maps(plain.shape[1:], p, sigma, pi, inv)
