"""Block positions from ciphertexts scrambled alike (``scramble``): a jigsaw over block edges summed over
all images (used by :func:`ppvit.attacks.ciphertext_only.recover_plan`)."""

from __future__ import annotations

import numpy as np


def solve_jigsaw(images: np.ndarray, p: int) -> np.ndarray:
    """sigma: block b of NHWC ``images`` (all scrambled alike) belongs at block position sigma[b].

    Edge mismatches summed over all images score every ordered pair of blocks side by side
    and one above the other; pairs are then joined most confident first (a Kruskal-style
    merge of placed groups that refuses overlaps and groups larger than the image).
    """
    n, h, w, c = images.shape
    gh, gw = h // p, w // p
    blocks = images.reshape(n, gh, p, gw, p, c).transpose(1, 3, 0, 2, 4, 5).astype(np.float64)
    blocks = blocks.reshape(gh * gw, n, p, p, c)
    costs = [_edge_costs(blocks, axis=3), _edge_costs(blocks, axis=2)]  # b right of a, b below a
    places = _merge_pieces(costs, gh, gw)
    return places[:, 0] * gw + places[:, 1]


def _edge_costs(blocks: np.ndarray, axis: int) -> np.ndarray:
    """cost[a, b]: mismatch of block b placed after block a along ``axis`` (3: columns, 2: rows),
    each side extrapolated half a pixel towards the seam, relative to the best alternatives."""
    from scipy.spatial.distance import cdist

    last, before = np.take(blocks, -1, axis=axis), np.take(blocks, -2, axis=axis)
    first, after = np.take(blocks, 0, axis=axis), np.take(blocks, 1, axis=axis)
    u = (last + (last - before) / 2).reshape(len(blocks), -1)
    v = (first - (after - first) / 2).reshape(len(blocks), -1)
    cost = cdist(u, v, "cityblock")
    np.fill_diagonal(cost, np.inf)
    second_row, second_col = np.partition(cost, 1, axis=1)[:, 1], np.partition(cost, 1, axis=0)[1]
    scale = np.minimum(second_row[:, None], second_col[None, :])
    return cost / np.maximum(scale, 1e-9)


def _merge_pieces(costs: list[np.ndarray], gh: int, gw: int) -> np.ndarray:
    """(blocks, 2) grid positions from pairwise costs (right-of, below), most confident pair first."""
    m = len(costs[0])
    group = np.arange(m)  # group id of each block
    pos = np.zeros((m, 2), dtype=np.int64)  # position within its group
    steps = np.array([(0, 1), (1, 0)])
    order = np.argsort(np.concatenate([c.ravel() for c in costs]), kind="stable")
    for flat in order:
        d, rest = divmod(int(flat), m * m)
        a, b = divmod(rest, m)
        ga, gb = group[a], group[b]
        if ga == gb or not np.isfinite(costs[d][a, b]):
            continue
        moved = group == gb
        shifted = pos[moved] + (pos[a] + steps[d] - pos[b])
        kept = pos[group == ga]
        both = np.concatenate([kept, shifted])
        if np.ptp(both[:, 0]) >= gh or np.ptp(both[:, 1]) >= gw:
            continue
        if len({tuple(q) for q in both.tolist()}) < len(both):
            continue
        pos[moved], group[moved] = shifted, ga
        if (group == ga).all():
            break
    return _fill_frame(pos, group, costs, gh, gw)


def _fill_frame(pos: np.ndarray, group: np.ndarray, costs: list[np.ndarray], gh: int, gw: int) -> np.ndarray:
    """Final positions in the frame: the largest group where it lies, any other block into a free
    cell by an assignment on its mismatch with the placed blocks there (a fallback, rarely used)."""
    from scipy.optimize import linear_sum_assignment

    main = np.bincount(group).argmax()
    inside = group == main
    out = np.full((len(pos), 2), -1)
    out[inside] = pos[inside] - pos[inside].min(0)
    loose = np.flatnonzero(~inside)
    if len(loose) == 0:
        return out
    taken = {tuple(q) for q in out[inside].tolist()}
    free = [(r, c) for r in range(gh) for c in range(gw) if (r, c) not in taken]
    at = {tuple(out[b]): b for b in np.flatnonzero(inside)}
    score = np.zeros((len(loose), len(free)))
    for j, (r, c) in enumerate(free):
        for (dr, dc), d, before in (((0, -1), 0, True), ((-1, 0), 1, True), ((0, 1), 0, False), ((1, 0), 1, False)):
            other = at.get((r + dr, c + dc))
            if other is not None:
                score[:, j] += costs[d][other, loose] if before else costs[d][loose, other]
    rows, cols = linear_sum_assignment(score)
    out[loose[rows]] = np.array(free)[cols]
    return out
