"""Keyed dense block mixings: one secret invertible matrix applied to every block (beyond the paper).

A permutation of a block's ``n = p*p*C`` values (``shuffle``) only moves values, so each
position keeps its pixel statistics and the key falls to a few ciphertexts. Any invertible
linear map ``A`` of a block, the same in every block, is still absorbed exactly by a ViT's
patch embedding (``W' = W A^-1``, :mod:`ppvit.models.transform`), but moves energy across
positions. Two such steps end a scheme (``mix``, ``scramble+mix``, ``lift``, ...), applied to
each block after the gather steps; values are in (row, column, channel) order as everywhere.

``mix`` (keyed orthogonal matrix, float16 ciphertext)
    Label ``ppvit/v1/mix/p=<p>/c=<C>``. Read ``2 n^2`` big-endian u32 ``k`` from the key stream
    (:mod:`ppvit.crypto.keys`), ``u = (k + 0.5) / 2**32``; consecutive pairs ``(u1, u2)`` give
    one normal ``z = sqrt(-2 ln u1) cos(2 pi u2)`` (Box-Muller, cosine branch only); ``G`` is
    the ``n x n`` matrix of the ``z`` in row-major order; ``Q R = G`` (QR decomposition) with
    the signs fixed so that ``diag(R) > 0`` (then ``Q`` is unique: a Haar-random orthogonal
    matrix), ``A = Q``. A block ``x`` (uint8) encrypts to
    ``y = float16(A (x - 127.5) + 127.5)``, computed in float64; decryption is
    ``clip(round(A^T (y - 127.5) + 127.5), 0, 255)``. Ciphertext values stay near [0, 255]
    (an orthogonal map keeps the norm and spreads it), 2 bytes a value.
``lift`` (keyed unimodular integer matrix, int16 or int32 ciphertext, lossless)
    ``LIFT_LAYERS`` layers; layer ``l`` draws a permutation ``perm`` of ``n`` with label
    ``ppvit/v1/lift/p=<p>/c=<C>/layer=<l>`` and ``n // 2`` choices in ``range(4)`` with label
    ``.../layer=<l>/ops``. Pair ``k`` is ``a = perm[2k]``, ``b = perm[2k+1]``; choice 0 does
    ``v[a] += v[b]``, 1 ``v[a] -= v[b]``, 2 ``v[b] += v[a]``, 3 ``v[b] -= v[a]`` (pairs are
    disjoint, so a layer is one vectorised step). A block encrypts as ``v = x - 128``, computed
    in int32 through the layers; decryption undoes them in reverse order, exactly. The matrix
    ``U`` has determinant +-1 and integer entries, and ``|y| <= 128 * max_i sum_j |U_ij|``
    (:func:`lift_bound`; each layer at most doubles it, so ``<= 128 * 2**LIFT_LAYERS``). The
    ciphertext is int16 when the key's bound is below ``2**15`` (typical at 10 layers: about
    20,000), int32 otherwise. With 10 layers an output depends on about 50 of the 768 inputs
    (measured: 2 to 150); more layers mix more but need int32 and grow the condition number
    (about 900 at 10 layers, 16,000 at 16), which the model transformation and training pay
    for. A lossless int16 ciphertext cannot mix densely: an output that depends on ``k``
    inputs has ``sum_j |U_ij| >= k``, so ``|y| < 2**15`` allows at most 256 inputs per output.

Both derivations use only the documented key stream, IEEE float64 arithmetic and a QR
decomposition; another BLAS/LAPACK may differ in the last bits of ``A`` (1e-15), which can move
a float16 ciphertext value by one unit in the last place and never changes a decrypted pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ppvit.crypto.keys import Key

MIXING_STEPS = ("mix", "lift")
LIFT_LAYERS = 10
CIPHERTEXT_DTYPES: dict[str | None, tuple[str, ...]] = {
    None: ("uint8",),
    "mix": ("float16",),
    "lift": ("int16", "int32"),
}
"""The dtypes a scheme's ciphertext may have, by its mixing step (None: none), whatever the key."""


@dataclass(frozen=True, eq=False)
class BlockMixing:
    """One keyed block map: ``encrypt``/``decrypt`` on (..., n) tensors, and its real-arithmetic
    form ``u = matrix @ v + offset`` in the pipeline's units (``v = x / 255``, ``u = y / 255``),
    which the model transformation inverts."""

    name: str
    dtype: torch.dtype  # of the ciphertext
    matrix: np.ndarray  # float64 (n, n)
    offset: np.ndarray  # float64 (n,)
    layers: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = ()  # lift: (dst, src, sign) per layer

    def encrypt(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 (..., n) -> ciphertext (..., n) of ``self.dtype``."""
        if blocks.dtype != torch.uint8:
            raise ValueError(f"{self.name} encrypts uint8 images, got {blocks.dtype}")
        if self.name == "mix":
            a = torch.from_numpy(self.matrix).to(blocks.device)
            return ((blocks.double() - 127.5) @ a.T + 127.5).to(torch.float16)
        v = blocks.to(torch.int32) - 128
        for dst, src, sign in self.layers:
            d, s, g = (torch.from_numpy(t).to(blocks.device) for t in (dst, src, sign))
            v[..., d] += g * v[..., s]
        return v.to(self.dtype)

    def decrypt(self, cipher: torch.Tensor) -> torch.Tensor:
        """Ciphertext (..., n) -> uint8 (..., n)."""
        if cipher.dtype != self.dtype:
            raise ValueError(f"{self.name} ciphertext is {self.dtype}, got {cipher.dtype}")
        if self.name == "mix":
            a = torch.from_numpy(self.matrix).to(cipher.device)
            x = (cipher.double() - 127.5) @ a + 127.5
            return x.round().clamp(0, 255).to(torch.uint8)
        v = cipher.to(torch.int32, copy=True)  # a copy: intermediate values may exceed int16
        for dst, src, sign in reversed(self.layers):
            d, s, g = (torch.from_numpy(t).to(cipher.device) for t in (dst, src, sign))
            v[..., d] -= g * v[..., s]
        return (v + 128).clamp(0, 255).to(torch.uint8)


MAX_MIXED_VALUES = 32 * 32 * 3
"""The largest block a mixing takes, in values: its keyed matrix has this many squared (75 MB of float64)."""


def block_mixing(key: Key, name: str, p: int, c: int) -> BlockMixing:
    """The keyed mixing ``name`` (``mix`` or ``lift``) for ``p x p x c`` blocks (cached per key)."""
    if name not in MIXING_STEPS:
        raise ValueError(f"unknown mixing {name!r}; choose from {', '.join(MIXING_STEPS)}")
    if p * p * c > MAX_MIXED_VALUES:  # the matrix is (p*p*c)^2: 18 GiB at blocks of 128, before a word
        raise ValueError(f"{name} in blocks of {p}: at most {MAX_MIXED_VALUES} values a block (32 x 32 x 3)")
    return _cached(key.secret, name, p, c)


@lru_cache(maxsize=8)
def _cached(secret: bytes, name: str, p: int, c: int) -> BlockMixing:
    key, n = Key(secret), p * p * c
    if name == "mix":
        a = orthogonal_matrix(key, p, c)
        return BlockMixing(name, torch.float16, a, 0.5 - 0.5 * a.sum(1))
    layers = lift_layers(key, p, c)
    u = lift_matrix(layers, n)
    dtype = torch.int16 if lift_bound(u) < 2**15 else torch.int32
    return BlockMixing(name, dtype, u.astype(np.float64), -(128 / 255) * u.sum(1).astype(np.float64), layers)


def orthogonal_matrix(key: Key, p: int, c: int) -> np.ndarray:
    """``mix``'s ``A`` (module docstring): QR of a keyed Gaussian matrix with ``diag(R) > 0``."""
    n = p * p * c
    k = np.frombuffer(key.stream(f"ppvit/v1/mix/p={p}/c={c}").read(8 * n * n), dtype=">u4").astype(np.float64)
    u = (k + 0.5) / 2.0**32
    g = (np.sqrt(-2.0 * np.log(u[0::2])) * np.cos(2.0 * math.pi * u[1::2])).reshape(n, n)
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))


def lift_layers(key: Key, p: int, c: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """``lift``'s layers as (dst, src, sign) index arrays: ``v[dst] += sign * v[src]``."""
    n = p * p * c
    out = []
    for layer in range(LIFT_LAYERS):
        label = f"ppvit/v1/lift/p={p}/c={c}/layer={layer}"
        perm = key.permutation(label, n)[: n - n % 2].reshape(-1, 2)
        ops = key.choices(label + "/ops", n // 2, 4)
        into_a = ops < 2
        dst = np.where(into_a, perm[:, 0], perm[:, 1])
        src = np.where(into_a, perm[:, 1], perm[:, 0])
        sign = np.where(ops % 2 == 0, 1, -1).astype(np.int32)
        out.append((dst, src, sign))
    return tuple(out)


def lift_matrix(layers: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...], n: int) -> np.ndarray:
    """The integer matrix ``U`` of the layers (int64): ``y = U (x - 128)``."""
    rows = np.eye(n, dtype=np.int64)  # row j: the image of basis vector e_j, i.e. column j of U
    for dst, src, sign in layers:
        rows[:, dst] += sign * rows[:, src]
    return rows.T.copy()


def lift_bound(u: np.ndarray) -> int:
    """The largest ``|y|`` any uint8 block can give: ``128 * max_i sum_j |U_ij|``."""
    return int(128 * np.abs(u).sum(1).max())
