"""Attacks on the dense block mixings (``mix``, ``lift``): second- and higher-order statistics, known plaintext.

A mixing is ``y_c = A x_c`` per block, with centred values ``x_c = x - c_in``, ``y_c = y - c_out``
(``mix``: ``c_in = c_out = 127.5``; ``lift``: ``c_in = 128, c_out = 0``) and the same secret ``A``
in every block. The attacker knows the algorithm (Kerckhoffs), not ``A``.

Known plaintext: every pair of blocks is one linear equation per value, so pairs spanning the
blocks' space give ``A`` by least squares (for ``lift``, rounding gives the integers exactly).
Natural images span fewer than ``n`` dimensions, and the decryptor learnt on their span decrypts
any other natural image: :func:`known_plaintext_decryptor`.

Ciphertext only (:func:`second_order_attack`): the attacker estimates, from public images of the
same kind (the prior) and from the ciphertexts, the block mean, covariance ``C`` and the
cross-covariances of neighbouring blocks ``R`` (right), ``D`` (down), ``G`` (down-right). For the
truth, ``C_y = A C_x A^T`` and the same for every lag, and ``mean_y_c = A mean_x_c``. Whitening
both sides on their top ``k`` principal components (``z = Lambda^-1/2 E^T (v - mean)``) leaves one
unknown orthogonal ``Q`` (``z_y = Q z_x``), which the lags identify when their spectra are
distinct (AMUSE / SOBI in blind source separation). ``Q`` starts from the eigenvectors of the
symmetrised whitened lags, signs chosen by matching each component's sample distribution (its
mean and skew), then maximises ``sum_M tr(M_x^T Q^T M_y Q) + tr(Q^T m_y m_x^T)`` over orthogonal
matrices (minorise-maximise: ``Q <- polar(gradient + tau Q)``). The decryptor is
``x = mean_x + E_x Lambda_x^1/2 Q^T z_y``: the block's top-``k`` part, estimated.

:func:`ica_attack` adds higher-order statistics: FastICA on both whitened sides, components matched by
kurtosis, skew and neighbour correlations. Measured on CIFAR-10 (RESULTS.md) the components of the
two sides correspond, but that matching fails (below the thumbnail). :func:`ica_search_attack`
matches them instead by an exhaustive search over signed permutations, 8 components at a time,
scored by the neighbour correlations and the centre's position: above the thumbnail from 100
ciphertexts, the strongest attack here, and the one ``ppvit audit`` reports beside the second-order one.

:func:`thumbnail` is the reference: the block-mean image (one colour per block) upscaled, what a
scheme that leaks only block means (e.g. ``shuffle``) shows for free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ppvit.attacks.metrics import to_blocks
from ppvit.crypto.keys import Key

CENTRES = {"mix": (127.5, 127.5), "lift": (128.0, 0.0)}  # (c_in, c_out) per scheme
SAMPLE = 20_000  # blocks kept per side for the sign choice
# a whitened lag or mean of one ICA component differs between two samples of the same source by
# up to ~0.1 (measured on synthetic blocks), far above 1/sqrt(blocks): its noise in the matching
LAG_FLOOR = 0.1
LAGS = ("right", "down", "diag")  # the neighbour blocks whose correlations the attacks match


@dataclass
class BlockStats:
    """Running first- and second-order block statistics of NHWC images (uint8, float16 or ints)."""

    p: int
    count: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None
    lags: dict[str, list] = field(default_factory=dict)  # name -> [sum of x_b x_b'^T, pairs]
    sample: list[np.ndarray] = field(default_factory=list)

    def add(self, images: np.ndarray, seed: int = 0) -> BlockStats:
        """Accumulate a batch (all images one size); returns self."""
        n, h, w, _ = images.shape
        gh, gw = h // self.p, w // self.p
        b = to_blocks(images, self.p).astype(np.float64).reshape(n, gh, gw, -1)
        flat = b.reshape(-1, b.shape[-1])
        if self.total is None:
            self.total, self.outer = np.zeros(flat.shape[1]), np.zeros((flat.shape[1],) * 2)
        self.count += len(flat)
        self.total += flat.sum(0)
        self.outer += flat.T @ flat
        pairs = {"right": (b[:, :, :-1], b[:, :, 1:]), "down": (b[:, :-1], b[:, 1:])}
        pairs["diag"] = (b[:, :-1, :-1], b[:, 1:, 1:])
        for name, (u, v) in pairs.items():
            u, v = u.reshape(-1, flat.shape[1]), v.reshape(-1, flat.shape[1])
            acc = self.lags.setdefault(name, [np.zeros_like(self.outer), 0])
            acc[0] += u.T @ v
            acc[1] += len(u)
        # a uniform sample of every block seen so far: each batch keeps its share of SAMPLE
        rng = np.random.default_rng(seed + self.count)
        old = np.concatenate(self.sample) if self.sample else flat[:0]
        new_share = min(len(flat), max(1, round(SAMPLE * len(flat) / self.count)))
        old_share = min(len(old), SAMPLE - new_share)
        self.sample = [old[rng.permutation(len(old))[:old_share]], flat[rng.permutation(len(flat))[:new_share]]]
        return self

    @classmethod
    def of(cls, batches: Iterable[np.ndarray], p: int) -> BlockStats:
        stats = cls(p)
        for batch in batches:
            stats.add(batch)
        return stats

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def cov(self) -> np.ndarray:
        return self.outer / self.count - np.outer(self.mean, self.mean)

    def lag(self, name: str) -> np.ndarray:
        s, k = self.lags[name]
        return s / k - np.outer(self.mean, self.mean)


@dataclass(frozen=True)
class LinearDecryptor:
    """``x = y @ matrix.T + offset`` per block: an attacker's estimate of the inverse map."""

    matrix: np.ndarray
    offset: np.ndarray

    def decrypt(self, cipher: np.ndarray, p: int) -> np.ndarray:
        """NHWC ciphertext -> NHWC uint8 estimate of the plain images."""
        n, h, w, c = cipher.shape
        y = to_blocks(cipher, p).astype(np.float64)
        x = np.clip(np.rint(y @ self.matrix.T + self.offset), 0, 255).astype(np.uint8)
        return x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def known_plaintext_decryptor(plain: np.ndarray, cipher: np.ndarray, p: int) -> LinearDecryptor:
    """Least squares ``x ~ B y + o`` over every block of the pairs (minimum-norm where they do not span)."""
    x = to_blocks(plain, p).reshape(-1, plain.shape[-1] * p * p).astype(np.float64)
    y = to_blocks(cipher, p).reshape(len(x), -1).astype(np.float64)
    my, mx = y.mean(0), x.mean(0)
    sol, *_ = np.linalg.lstsq(y - my, x - mx, rcond=1e-10)
    return LinearDecryptor(sol.T, mx - my @ sol)


def _whitener(stats: BlockStats, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, W^+): ``z = W (v - mean)`` is white on the top ``k`` principal components."""
    lam, vec = np.linalg.eigh(stats.cov)
    lam, vec = np.maximum(lam[::-1][:k], 1e-12), vec[:, ::-1][:, :k]
    return (vec / np.sqrt(lam)).T, vec * np.sqrt(lam)


def _polar(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def _sign_by_distribution(a: np.ndarray, b: np.ndarray) -> float:
    """+1 or -1: which sign of ``b``'s samples matches ``a``'s quantiles better (mean and skew)."""
    q = np.linspace(0.01, 0.99, 99)
    qa, qb = np.quantile(a, q), np.quantile(b, q)
    return 1.0 if np.abs(qa - qb).sum() <= np.abs(qa + qb[::-1]).sum() else -1.0


def second_order_attack(
    cipher: BlockStats, prior: BlockStats, scheme: str, k: int = 128, iters: int = 60
) -> LinearDecryptor:
    """The ciphertext-only decryptor of a ``mix``/``lift`` ciphertext (module docstring)."""
    k = min(k, cipher.count // 2)
    wx, wx_pinv, wy, lags, mx, my = _whitened_problem(cipher, prior, scheme, k)
    # AMUSE start: eigenvectors of one symmetrised whitened lag combination, signs by distribution
    weights = (1.0, 0.61, 0.37)
    sym_x = sum(w * (m + m.T) for w, (m, _) in zip(weights, lags, strict=True))
    sym_y = sum(w * (m + m.T) for w, (_, m) in zip(weights, lags, strict=True))
    _, ux = np.linalg.eigh(sym_x)
    _, uy = np.linalg.eigh(sym_y)
    zx = (np.concatenate(prior.sample) - prior.mean) @ wx.T @ ux
    zy = (np.concatenate(cipher.sample) - cipher.mean) @ wy.T @ uy
    signs = np.array([_sign_by_distribution(zy[:, i], zx[:, i]) for i in range(k)])
    q = _refine(uy @ np.diag(signs) @ ux.T, lags, mx, my, iters)
    matrix = wx_pinv @ q.T @ wy
    return LinearDecryptor(matrix, prior.mean - matrix @ cipher.mean)


def _whitened_problem(cipher: BlockStats, prior: BlockStats, scheme: str, k: int) -> tuple:
    """Both sides whitened on their top ``k`` components: (wx, wx^+, wy, lag pairs, mean pair)."""
    c_in, c_out = CENTRES[scheme]
    wx, wx_pinv = _whitener(prior, k)
    wy, _ = _whitener(cipher, k)
    lags = [(wx @ prior.lag(n) @ wx.T, wy @ cipher.lag(n) @ wy.T) for n in LAGS]
    lags = [(mx / np.linalg.norm(mx), my / np.linalg.norm(mx)) for mx, my in lags]
    # mean of the centred values, whitened: Q m_x = m_y
    return wx, wx_pinv, wy, lags, wx @ (c_in - prior.mean), wy @ (c_out - cipher.mean)


def _refine(q: np.ndarray, mats: list, mx: np.ndarray, my: np.ndarray, iters: int) -> np.ndarray:
    """Maximise ``sum_M tr(M_x^T Q^T M_y Q) + w m_y^T Q m_x`` over orthogonal ``Q`` from ``q``
    (minorise-maximise: ``Q <- polar(gradient + tau Q)``, which never decreases it)."""
    tau = 2 * sum(np.linalg.norm(a, 2) * np.linalg.norm(b, 2) for a, b in mats) + 1.0
    mean_weight = 1.0 / max(np.linalg.norm(mx) * np.linalg.norm(my), 1e-12)
    for _ in range(iters):
        grad = sum(b @ q @ a.T + b.T @ q @ a for a, b in mats)
        q = _polar(grad + mean_weight * np.outer(my, mx) + tau * q)
    return q


def fastica(z: np.ndarray, iters: int = 200, tol: float = 1e-5, seed: int = 0) -> np.ndarray:
    """Symmetric FastICA (logcosh contrast) of white samples ``z`` (m, k): the orthogonal ``U`` whose
    rows give the most non-Gaussian directions, ``s = z @ U.T`` (up to order and sign)."""
    m, k = z.shape
    u = _polar(np.random.default_rng(seed).standard_normal((k, k)))
    for _ in range(iters):
        g = np.tanh(z @ u.T)
        new = _polar(g.T @ z / m - (1.0 - g**2).mean(0)[:, None] * u)  # fixed point, then decorrelate
        done = np.abs(np.abs((new * u).sum(1)) - 1.0).max() < tol
        u = new
        if done:
            break
    return u


def _signatures(s: np.ndarray, u: np.ndarray, lags: list[np.ndarray], m: np.ndarray, count: int) -> tuple:
    """Per component (rows of ``u``, samples ``s``): excess kurtosis, skew, the correlation with itself
    in the right/down/diagonal neighbour block, and its part of the centre's whitened position, with
    each one's sampling variance. The mixing changes none of them: they identify a component on
    both sides."""
    kurt, skew = (s**4).mean(0) - 3.0, (s**3).mean(0)
    auto = [np.einsum("ij,jk,ik->i", u, lag, u) for lag in lags]
    values = np.stack([kurt, skew, *auto, u @ m], 1)
    var = np.full_like(values, 1.0 / count + LAG_FLOOR**2)  # lags and mean: from every block seen
    var[:, 0], var[:, 1] = (s**4).var(0) / len(s), (s**3).var(0) / len(s)
    return values, var


def ica_attack(
    cipher: BlockStats, prior: BlockStats, scheme: str, k: int = 16, iters: int = 60, refine: bool = True
) -> LinearDecryptor:
    """Independent components of both sides, matched by their signatures (:func:`_signatures`).

    Whitening leaves ``z_y = Q z_x`` with ``Q`` orthogonal; ICA gives ``s_x = U_x z_x`` and
    ``s_y = U_y z_y`` up to order and sign. Signs: each component's heavy tail made positive (skew).
    Order: the assignment that minimises the signatures' distance (Hungarian), then
    ``Q = U_y^T P U_x``; ``refine`` continues from it with the lags and the mean as
    :func:`second_order_attack` does.
    """
    from scipy.optimize import linear_sum_assignment

    k = min(k, cipher.count // 2)
    wx, wx_pinv, wy, lags, mx, my = _whitened_problem(cipher, prior, scheme, k)
    zx = (np.concatenate(prior.sample) - prior.mean) @ wx.T
    zy = (np.concatenate(cipher.sample) - cipher.mean) @ wy.T
    sides = []
    for z, w, m, stats in ((zx, wx, mx, prior), (zy, wy, my, cipher)):
        u = fastica(z)
        s = z @ u.T
        sign = np.where((s**3).mean(0) < 0, -1.0, 1.0)
        u, s = u * sign[:, None], s * sign
        corr = [w @ stats.lag(n) @ w.T for n in LAGS]  # correlations: not rescaled
        sides.append((u, *_signatures(s, u, corr, m, stats.count)))
    (ux, fx, vx), (uy, fy, vy) = sides
    # a difference weighed by what sampling noise alone would make it: (y component, x component)
    cost = ((fy[:, None, :] - fx[None, :, :]) ** 2 / (vy[:, None, :] + vx[None, :, :])).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    q = uy[rows].T @ ux[cols]
    if refine:
        q = _refine(q, lags, mx, my, iters)
    matrix = wx_pinv @ q.T @ wy
    return LinearDecryptor(matrix, prior.mean - matrix @ cipher.mean)


def _signed_assignment(lx: list[np.ndarray], ly: list[np.ndarray], lin: np.ndarray, chunk: int = 5040) -> np.ndarray:
    """The signed permutation ``P`` (``P[pi_j, j] = sigma_j``) maximising
    ``sum_t tr(lx_t^T P^T ly_t P) + tr(lin^T P)``, by trying all ``g! 2^g`` of them (``g = len(lin)``),
    ``chunk`` permutations (times every sign) per matrix product."""
    import itertools

    g = len(lin)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=g)))
    outer = (signs[:, :, None] * signs[:, None, :]).reshape(len(signs), -1).T  # (g*g, signs): s_j s_l
    best, arg = -np.inf, None
    perms = np.array(list(itertools.permutations(range(g))))
    for start in range(0, len(perms), chunk):
        pi = perms[start : start + chunk]
        pair = sum(x[None] * y[pi[:, :, None], pi[:, None, :]] for x, y in zip(lx, ly, strict=True))
        score = pair.reshape(len(pi), -1) @ outer + lin[pi, np.arange(g)] @ signs.T  # one product per chunk
        b, s = np.unravel_index(score.argmax(), score.shape)
        if score[b, s] > best:
            best, arg = score[b, s], (pi[b], signs[s])
    out = np.zeros((g, g))
    out[arg[0], np.arange(g)] = arg[1]
    return out


def _cross_terms(
    corr_x: list[np.ndarray], corr_y: list[np.ndarray], solved: np.ndarray, done: slice, g: slice
) -> np.ndarray:
    """``C`` such that, for ``Q = solved (+) Q_g`` block diagonal, the terms of
    ``sum_t tr(X_t^T Q^T Y_t Q)`` that hold both blocks are ``tr(C^T Q_g)``."""
    out = np.zeros((g.stop - g.start,) * 2)
    for cx, cy in zip(corr_x, corr_y, strict=True):
        out += cy[done, g].T @ solved @ cx[done, g] + cy[g, done] @ solved @ cx[g, done].T
    return out


def ica_search_attack(
    cipher: BlockStats, prior: BlockStats, scheme: str, k: int = 32, group: int = 8
) -> LinearDecryptor:
    """ICA components matched by an exhaustive search, ``group`` whitened components at a time.

    Both sides whitened on their top ``k`` components (``z_y = Q z_x``). The components are taken
    ``group`` at a time in the order of their variance (8 + 8 + ...); in each group FastICA gives
    ``s_x = U_x z_x``, ``s_y = U_y z_y`` up to order and sign, and the group's block of ``Q`` is
    ``U_y^T P U_x`` for the signed permutation ``P`` that maximises the terms :func:`_refine` maximises,
    weighted differently (the neighbour-block correlations unnormalised, the centre's position at
    weight 1, and their cross terms with the groups already solved: :func:`_cross_terms`), over all
    ``group! 2^group`` of them (10^7 at 8, under a second). A continuous refinement from this start
    loses more than it gains (RESULTS.md), so there is none. The groups assume ``Q`` block diagonal:
    true up to near-equal eigenvalues for an orthogonal ``A`` (``mix``, whose spectrum the
    whitening keeps), an approximation for ``lift``'s unimodular one. ``k`` is at most the block's
    number of values and half the blocks of either side.
    """
    k = min(k, cipher.count // 2, prior.count // 2, len(cipher.mean))
    wx, wx_pinv, wy, _, mx, my = _whitened_problem(cipher, prior, scheme, k)
    zx = (np.concatenate(prior.sample) - prior.mean) @ wx.T
    zy = (np.concatenate(cipher.sample) - cipher.mean) @ wy.T
    corr_x = [wx @ prior.lag(n) @ wx.T for n in LAGS]  # correlations, as the matching noise is judged
    corr_y = [wy @ cipher.lag(n) @ wy.T for n in LAGS]
    q = np.zeros((k, k))
    for start in range(0, k, group):
        g, done = slice(start, min(start + group, k)), slice(0, start)
        ux, uy = fastica(zx[:, g]), fastica(zy[:, g])
        lin = _cross_terms(corr_x, corr_y, q[done, done], done, g) + np.outer(my[g], mx[g])
        p = _signed_assignment(
            [ux @ c[g, g] @ ux.T for c in corr_x], [uy @ c[g, g] @ uy.T for c in corr_y], uy @ lin @ ux.T
        )
        q[g, g] = uy.T @ p @ ux
    matrix = wx_pinv @ q.T @ wy
    return LinearDecryptor(matrix, prior.mean - matrix @ cipher.mean)


def orthogonal_attack(
    cipher: BlockStats, prior: BlockStats, scheme: str, k: int = 64, iters: int = 60
) -> LinearDecryptor:
    """For an orthogonal ``A`` (``mix``): align the top-``k`` principal components unwhitened.

    ``C_y = A C_x A^T`` keeps the spectrum, so the i-th eigenvector of ``C_y`` is ``A`` times the
    i-th of ``C_x`` where eigenvalues are distinct (the top ones of natural images are: block mean
    per colour, then the gradients); signs by distribution, then the covariance, the lags and the
    mean refine ``Q`` (``U_k^T A V_k``) where eigenvalues are close.
    """
    c_in, c_out = CENTRES[scheme]
    k = min(k, cipher.count // 2)
    _, vx = np.linalg.eigh(prior.cov)
    _, vy = np.linalg.eigh(cipher.cov)
    vx, vy = vx[:, ::-1][:, :k], vy[:, ::-1][:, :k]
    mats = [(prior.cov, cipher.cov)] + [(prior.lag(n), cipher.lag(n)) for n in LAGS]
    mats = [(vx.T @ mx @ vx, vy.T @ my @ vy) for mx, my in mats]
    scale = [np.linalg.norm(mx) for mx, _ in mats]
    mats = [(mx / s, my / s) for (mx, my), s in zip(mats, scale, strict=True)]
    mx, my = vx.T @ (prior.mean - c_in), vy.T @ (cipher.mean - c_out)
    zx = (np.concatenate(prior.sample) - c_in) @ vx
    zy = (np.concatenate(cipher.sample) - c_out) @ vy
    q = np.diag([_sign_by_distribution(zy[:, i], zx[:, i]) for i in range(k)])
    q = _refine(q, mats, mx, my, iters)
    matrix = vx @ q.T @ vy.T  # x_c = V_k Q^T U_k^T y_c on the top-k part; the prior's mean elsewhere
    rest = prior.mean - vx @ (vx.T @ prior.mean)
    return LinearDecryptor(
        matrix, rest + vx @ (vx.T @ np.full_like(prior.mean, c_in)) - matrix @ np.full_like(prior.mean, c_out)
    )


def thumbnail(images: np.ndarray, p: int) -> np.ndarray:
    """The block-mean image upscaled back (bicubic, as ppvit resizes): the reference every scheme is held to."""
    from ppvit.attacks.metrics import upscale

    n, h, w, c = images.shape
    means = images.reshape(n, h // p, p, w // p, p, c).mean(axis=(2, 4))
    return upscale(np.clip(np.rint(means), 0, 255).astype(np.uint8), h, "bicubic")


def eight_bit(cipher: np.ndarray) -> np.ndarray:
    """A mixing's ciphertext rounded and clipped to uint8: what the 8-bit statistics and figures see of it."""
    return np.clip(np.rint(cipher.astype(np.float64)), 0, 255).astype(np.uint8)


def audit_mixing(
    key: Key, scheme: str, images: np.ndarray, pairs: tuple[int, ...], held_count: int, p: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``ppvit audit``'s report for a ``mix``/``lift`` scheme, in the shape of the EtC schemes' one.

    The first ``max(pairs)`` images are the attacker's: plain/encrypted pairs for known plaintext, and
    (their plain side only) the public prior of the ciphertext-only attacks (second order of rank 3,
    and :func:`ica_search_attack`), which see the held-out ciphertexts alone. ``plan_recovered`` is,
    for a matrix, the share of held-out values decrypted exactly. The stats of the EtC schemes are
    taken on the ciphertext rounded to 8 bits.
    """
    from ppvit.attacks.ciphertext_stats import block_mean_image, ciphertext_stats, jigsaw_neighbours, source_blocks
    from ppvit.attacks.metrics import psnr
    from ppvit.crypto.ciphers import BlockCipher, Scheme

    cipher, mixing = BlockCipher(key, scheme, p), Scheme.parse(scheme).mixing
    need = max(pairs)
    plain, held = images[:need], images[need : need + held_count]
    if len(held) == 0:
        raise ValueError(f"need more than {need} images (pairs plus held-out ones), got {len(images)}")
    enc_pairs, enc_held = cipher.encrypt(plain), cipher.encrypt(held)

    stats: dict[str, Any] = ciphertext_stats(held, eight_bit(enc_held), p)
    truth = source_blocks(cipher.plan(*images.shape[1:]), p)
    stats["jigsaw_neighbours"] = jigsaw_neighbours(eight_bit(cipher.encrypt(images)), p, truth)
    attack = orthogonal_attack if mixing == "mix" else second_order_attack
    seen, prior = BlockStats(p).add(enc_held), BlockStats(p).add(plain)
    guess = attack(seen, prior, mixing, k=3).decrypt(enc_held, p)
    searched = ica_search_attack(seen, prior, mixing).decrypt(enc_held, p)
    stats["second_order_psnr_db"], stats["ica_search_psnr_db"] = psnr(held, guess), psnr(held, searched)
    stats["thumbnail_reference_psnr_db"] = psnr(held, thumbnail(held, p))
    report: dict[str, Any] = {"scheme": scheme, "ciphertext_only": stats, "kpa": []}
    figure = {
        "plain": held[0],
        "encrypted": eight_bit(enc_held[:1])[0],
        "block means": block_mean_image(eight_bit(enc_held[:1]), p)[0],
    }
    figure["second-order, ciphertexts only"], figure["ICA search, ciphertexts only"] = guess[0], searched[0]
    for n in pairs:
        dec = known_plaintext_decryptor(plain[:n], enc_pairs[:n], p)
        decrypted = dec.decrypt(enc_held, p)
        exact = float((decrypted == held).mean())
        report["kpa"].append({"pairs": n, "plan_recovered": exact, "held_out_psnr_db": psnr(held, decrypted)})
        if n == pairs[0]:
            figure[f"known-plaintext, {n}"] = decrypted[0]
            other = BlockCipher(Key.generate(), scheme, p).encrypt(held)
            report["fresh_key_psnr_db"] = psnr(held, dec.decrypt(other, p))
    return report, figure
