"""Step 2 of the ciphertext-only attack: the pixels of a block laid out on its ``p x p`` cells.

Nearby pixels correlate more than distant ones: pixels are assigned to cells by graduated assignment and
by a spectral embedding of the partial correlation graph, then refined by moves and swaps that agree
best with a correlation-by-offset template (:func:`layout_pixels`); right up to the 8 symmetries of a block.
"""

from __future__ import annotations

import math

import numpy as np

from ppvit.attacks.metrics import assign


def standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    return x / np.maximum(x.std(0), 1e-9)


def pixel_similarity(flat: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """Correlation between pixels' brightness detail (brightness minus the block's mean)."""
    lum = flat[:, triplets].sum(-1)
    lum = lum - lum.mean(1, keepdims=True)
    z = standardise(lum)
    return z.T @ z / len(z)


def layout_pixels(flat: np.ndarray, triplets: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """Each pixel's cell (row-major in the ``p x p`` block), right up to the block's 8 symmetries.

    First guesses: a spectral embedding of the partial-correlation graph, and graduated
    assignments from random symmetry breaking (16 on small grids, where they are cheap and
    often stray; on larger ones until two agree, at most 4). Each is refined; the layout
    whose side-by-side pixels correlate most wins.
    """
    sim = pixel_similarity(flat, triplets)
    graph = _mutual_neighbours(partial_correlation(sim, len(flat)), 4)
    found = [refine_layout(sim, spectral_layout(graph, sim, p), p)]
    scores = [_neighbour_score(sim, found[0], p)]
    small = p * p <= 64
    for _ in range(16 if small else 4):
        found.append(refine_layout(sim, graduated_layout(sim, p, rng), p))
        scores.append(_neighbour_score(sim, found[-1], p))
        if not small and sum(np.isclose(scores, max(scores), rtol=0, atol=1e-9)) >= 2:
            break
    return found[int(np.argmax(scores))]


def graduated_layout(sim: np.ndarray, p: int, rng: np.random.Generator, reach: float = 2.0) -> np.ndarray:
    """A layout by graduated assignment (Gold & Rangarajan 1996) of the quadratic assignment
    ``max sum_ab sim[a, b] * exp(-distance(cell_a, cell_b) / reach)``: a soft assignment,
    kept doubly stochastic by Sinkhorn steps, hardens slowly, which avoids most of the local
    optima a swap search from a random start falls into. ``rng`` breaks the symmetry."""
    m = len(sim)
    r, c = np.divmod(np.arange(m), p)
    near = np.exp(-np.hypot(r[:, None] - r[None], c[:, None] - c[None]) / reach)
    np.fill_diagonal(near, 0)
    s = sim - np.diag(np.diag(sim))
    s = s - s.mean()
    soft = np.full((m, m), 1 / m) * (1 + 1e-3 * rng.random((m, m)))
    beta = 1.0
    while beta < 200:
        for _ in range(3):
            q = s @ soft @ near
            q = q / max(float(np.abs(q).max()), 1e-12)
            soft = np.exp(np.maximum(beta * (q - q.max(1, keepdims=True)), -300))  # never exactly 0
            for _ in range(10):
                soft /= soft.sum(1, keepdims=True)
                soft /= soft.sum(0, keepdims=True)
        if soft.max(1).min() > 0.99:  # hard already: the rest would change nothing
            break
        beta *= 1.1
    return assign(soft)


def partial_correlation(sim: np.ndarray, samples: int) -> np.ndarray:
    """Partial correlations from a correlation matrix (ridge-regularised when samples are few):
    in natural images a pixel depends on distant pixels mostly through its neighbours, so the
    four strongest partial correlations of a pixel are its grid neighbours."""
    m = len(sim)
    ridge = 1e-6 if samples > 4 * m else 0.25 * min(1.0, m / samples)  # fewer samples than values work too
    prec = np.linalg.inv(sim + ridge * np.eye(m))
    d = np.sqrt(np.diag(prec))
    out = -prec / d[:, None] / d[None]
    np.fill_diagonal(out, 0)
    return out


def _mutual_neighbours(score: np.ndarray, k: int) -> np.ndarray:
    """The graph joining pixels that are among each other's ``k`` best by ``score`` (either's,
    when that leaves it in pieces)."""
    from scipy.sparse.csgraph import connected_components

    m = len(score)
    s = score.copy()
    np.fill_diagonal(s, -np.inf)
    near = np.argsort(-s, axis=1)[:, : min(k, m - 1)]
    adj = np.zeros((m, m), dtype=bool)
    adj[np.repeat(np.arange(m), near.shape[1]), near.ravel()] = True
    mutual = adj & adj.T
    if connected_components(mutual, directed=False)[0] > 1:  # a Laplacian embedding needs one piece
        mutual = adj | adj.T
    return mutual.astype(np.float64)


def spectral_layout(graph: np.ndarray, sim: np.ndarray, p: int) -> np.ndarray:
    """A first layout: the two leading Laplacian eigenvectors of a neighbour graph (a grid's
    are its two coordinates, up to a rotation of the plane), cut into columns, then rows by
    rank, at the rotation whose side-by-side pixels correlate most."""
    m = len(sim)
    if m == 1:
        return np.zeros(1, dtype=np.int64)
    _, vecs = np.linalg.eigh(np.diag(graph.sum(1)) - graph)
    emb = vecs[:, 1:3]
    best, best_score = np.arange(m), -math.inf
    for theta in np.linspace(0, np.pi, 90, endpoint=False):
        x, y = emb @ np.array([math.cos(theta), math.sin(theta)]), emb @ np.array([-math.sin(theta), math.cos(theta)])
        cells = np.empty(m, dtype=np.int64)
        for col, ix in enumerate(np.array_split(np.argsort(x, kind="stable"), p)):
            cells[ix[np.argsort(y[ix], kind="stable")]] = np.arange(len(ix)) * p + col
        score = _neighbour_score(sim, cells, p)
        if score > best_score:
            best, best_score = cells, score
    return best


def _neighbour_score(sim: np.ndarray, cells: np.ndarray, p: int) -> float:
    """Summed similarity of pixels placed side by side or one above the other."""
    at = np.empty_like(cells)
    at[cells] = np.arange(len(cells))
    grid = at.reshape(p, p)
    return float(sim[grid[:, :-1], grid[:, 1:]].sum() + sim[grid[:-1], grid[1:]].sum())


def refine_layout(sim: np.ndarray, cells: np.ndarray, p: int, rounds: int = 30) -> np.ndarray:
    """Improve a layout for ``sum_ab sim[a, b] * template[offset(a, b)]``, the template being
    the mean similarity at each (|dy|, |dx|) in the current layout, re-estimated every round.

    A round moves all pixels at once (an assignment to the cells their current surroundings
    favour: fixes shifted rows) and then swaps pairs greedily (fixes local mistakes).
    """
    cells = cells.copy()
    s0 = sim - np.diag(np.diag(sim))
    for _ in range(rounds):
        before = cells.copy()
        template = _offset_template(sim, cells, p)
        moved = _move_all(s0, cells, template, p)
        if _objective(s0, moved, template, p) > _objective(s0, cells, template, p):
            cells = moved
        cells = _swap_greedily(s0, cells, template, p)
        if np.array_equal(cells, before):
            break
    return cells


def _objective(s0: np.ndarray, cells: np.ndarray, template: np.ndarray, p: int) -> float:
    return float((s0 * _template_matrix(template, cells, p)).sum())


def _move_all(s0: np.ndarray, cells: np.ndarray, template: np.ndarray, p: int) -> np.ndarray:
    """Every pixel to the cell where it fits the others' current places best, as one assignment."""
    r, c = np.divmod(np.arange(p * p), p)
    cell_template = template[np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None])]
    np.fill_diagonal(cell_template, 0)
    return assign(s0 @ cell_template[cells])


def _swap_greedily(s0: np.ndarray, cells: np.ndarray, template: np.ndarray, p: int) -> np.ndarray:
    """Best pair swaps (a quadratic assignment's local search) until none gains. ``s0 @ b`` is
    updated after each swap from the two rows and columns of ``b`` that changed."""
    cells = cells.copy()
    b = _template_matrix(template, cells, p)
    m = s0 @ b
    tol = 1e-9 * max(1.0, abs(float((s0 * b).sum())))
    while True:
        gain = _swap_gains(s0, b, m)
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= tol:
            return cells
        cells[[i, j]] = cells[[j, i]]
        new = _template_matrix(template, cells, p)
        change = new - b
        both = [i, j]
        m += s0[:, both] @ change[both]  # rows i and j of b
        change[both] = 0
        m[:, both] += s0 @ change[:, both]  # columns i and j, less what the rows counted
        b = new


def _offset_template(sim: np.ndarray, cells: np.ndarray, p: int) -> np.ndarray:
    """(p, p): mean similarity of the pixel pairs at each (|dy|, |dx|) in the layout."""
    dy, dx = _offsets(cells, p)
    total, count = np.zeros((p, p)), np.zeros((p, p))
    np.add.at(total, (dy, dx), sim)
    np.add.at(count, (dy, dx), 1)
    return total / np.maximum(count, 1)


def _offsets(cells: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = cells // p, cells % p
    return np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None])


def _template_matrix(template: np.ndarray, cells: np.ndarray, p: int) -> np.ndarray:
    dy, dx = _offsets(cells, p)
    b = template[dy, dx]
    np.fill_diagonal(b, 0)
    return b


def _swap_gains(a: np.ndarray, b: np.ndarray, ab: np.ndarray | None = None) -> np.ndarray:
    """gain[i, j]: change of ``sum(a * b)`` when items i and j trade places (a, b symmetric,
    zero diagonal, b the template seen from the items' current cells; ``ab``: ``a @ b``)."""
    m = a @ b if ab is None else ab
    d = np.diag(m)
    gain = 2 * (m + m.T - d[:, None] - d[None, :] + 2 * a * b)
    np.fill_diagonal(gain, 0)
    return gain
