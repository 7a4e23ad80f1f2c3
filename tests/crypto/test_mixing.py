"""Dense block mixings (``mix``, ``lift``): the documented derivation re-implemented, round trips, numpy == torch."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import KEY

from ppvit.crypto.ciphers import BlockCipher, Scheme, compile_plan
from ppvit.crypto.mixing import block_mixing, lift_bound, lift_layers, lift_matrix, orthogonal_matrix

MIXED = ["mix", "lift", "scramble+mix", "negpos:pixel+shuffle+scramble+lift"]


def images(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def to_blocks(x: np.ndarray, p: int) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * c)


def gram_schmidt(g: np.ndarray) -> np.ndarray:
    """Q of G = QR with diag(R) > 0, by modified Gram-Schmidt on the columns (not LAPACK's Householder)."""
    q = g.astype(np.float64).copy()
    for j in range(q.shape[1]):
        for i in range(j):
            q[:, j] -= (q[:, i] @ q[:, j]) * q[:, i]
        q[:, j] /= np.linalg.norm(q[:, j])
    return q


def test_mix_matrix_follows_its_documentation() -> None:
    """Re-derived from the raw key stream with the standard library's math and Gram-Schmidt."""
    p, c = 2, 3
    n = p * p * c
    raw = KEY.stream(f"ppvit/v1/mix/p={p}/c={c}").read(8 * n * n)
    u = [(int.from_bytes(raw[4 * i : 4 * i + 4], "big") + 0.5) / 2**32 for i in range(2 * n * n)]
    z = [math.sqrt(-2 * math.log(u[2 * i])) * math.cos(2 * math.pi * u[2 * i + 1]) for i in range(n * n)]
    expected = gram_schmidt(np.array(z).reshape(n, n))
    np.testing.assert_allclose(orthogonal_matrix(KEY, p, c), expected, rtol=0, atol=1e-12)


# Computed once with this derivation (v1). If these change, mix ciphertexts stop decrypting: fix the code.
GOLDEN_MIX = {(0, 0): 0.264903749681872, (0, 1): -0.025737102880672207, (47, 47): -0.022330146407380277}
GOLDEN_LIFT = {4: ("485f57a34a3dbf5c", 7680), 16: ("c03ed2975ba7c594", 20480)}


def test_golden_mix_matrix() -> None:
    a = orthogonal_matrix(KEY, 4, 3)
    np.testing.assert_allclose(a @ a.T, np.eye(48), atol=1e-13)
    for (i, j), v in GOLDEN_MIX.items():
        assert a[i, j] == pytest.approx(v, abs=1e-13)


@pytest.mark.parametrize("p", list(GOLDEN_LIFT))
def test_golden_lift_matrix(p: int) -> None:
    u = lift_matrix(lift_layers(KEY, p, 3), p * p * 3)
    assert hashlib.sha256(u.astype("<i8").tobytes()).hexdigest()[:16] == GOLDEN_LIFT[p][0]
    assert lift_bound(u) == GOLDEN_LIFT[p][1]
    assert round(abs(np.linalg.det(u.astype(np.float64)))) == 1  # unimodular


def test_lift_follows_its_documentation() -> None:
    """One block through the documented pair operations, in plain Python."""
    p, x = 4, images(1, 4)[0]
    v = [int(t) - 128 for t in x.reshape(-1)]  # (row, column, channel) order
    for layer in range(10):
        label = f"ppvit/v1/lift/p={p}/c=3/layer={layer}"
        perm, ops = KEY.permutation(label, 48), KEY.choices(label + "/ops", 24, 4)
        for k, op in enumerate(ops):
            a, b = int(perm[2 * k]), int(perm[2 * k + 1])
            if op < 2:
                v[a] += v[b] if op == 0 else -v[b]
            else:
                v[b] += v[a] if op == 2 else -v[a]
    got = BlockCipher(KEY, "lift", p).encrypt(x[None])
    assert to_blocks(got, p)[0, 0].tolist() == v


def test_mix_is_the_documented_float16_map() -> None:
    x = images(2, 8)
    a = orthogonal_matrix(KEY, 4, 3)
    expected = ((to_blocks(x, 4).astype(np.float64) - 127.5) @ a.T + 127.5).astype(np.float16)
    np.testing.assert_array_equal(to_blocks(BlockCipher(KEY, "mix", 4).encrypt(x), 4), expected)


@pytest.mark.parametrize("scheme", MIXED)
def test_round_trip_and_numpy_equals_torch(scheme: str) -> None:
    x = images(3, 32)
    cipher = BlockCipher(KEY, scheme, 8)
    y = cipher.encrypt(x)
    yt = cipher.encrypt(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_array_equal(yt.permute(0, 2, 3, 1).numpy(), y)
    assert y.dtype == (np.float16 if scheme.endswith("mix") else np.int16)
    np.testing.assert_array_equal(cipher.decrypt(y), x)  # worst case for float16: uniform noise
    np.testing.assert_array_equal(cipher.decrypt(yt).permute(0, 2, 3, 1).numpy(), x)


def test_mix_at_16_moves_energy_and_keeps_the_norm() -> None:
    """At the paper's block size the float16 ciphertext still decrypts exactly; no value keeps its pixel."""
    x = images(2, 32)
    cipher = BlockCipher(KEY, "mix", 16)
    y = cipher.encrypt(x)
    np.testing.assert_array_equal(cipher.decrypt(y), x)
    xb, yb = to_blocks(x, 16).astype(np.float64) - 127.5, to_blocks(y, 16).astype(np.float64) - 127.5
    np.testing.assert_allclose(np.linalg.norm(yb, axis=-1), np.linalg.norm(xb, axis=-1), rtol=1e-3)
    corr = np.corrcoef(xb.reshape(-1), yb.reshape(-1))[0, 1]
    assert abs(corr) < 0.05


def test_lift_stays_within_its_bound() -> None:
    mixing = block_mixing(KEY, "lift", 4, 3)
    extreme = np.where(mixing.matrix > 0, 255, 0).astype(np.uint8)  # the block that maximises each row
    y = mixing.encrypt(torch.from_numpy(extreme)).numpy()
    bound = lift_bound(mixing.matrix.astype(np.int64))
    assert np.abs(y).max() <= bound and y.max() >= 0.99 * bound * 255 / 256  # reached (up to -128 vs 127)


@pytest.mark.parametrize(
    ("text", "message"),
    [("mix+shuffle", "must be its last step"), ("mix+lift", "must be its last step"), ("mix:pixel", "takes no mode")],
)
def test_mixing_ends_a_scheme(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scheme.parse(text)


def test_mixing_is_absorbable_and_no_gather() -> None:
    scheme = Scheme.parse("shuffle+scramble+mix")
    assert scheme.absorbable and scheme.mixing == "mix" and str(scheme.gather) == "shuffle+scramble"
    with pytest.raises(ValueError, match="mix is no gather"):
        compile_plan(KEY, scheme, 4, (8, 8, 3))


def test_pil_refused_for_mixed_ciphertext() -> None:
    from PIL import Image

    with pytest.raises(ValueError, match="not an 8-bit image"):
        BlockCipher(KEY, "mix", 4).encrypt(Image.fromarray(images(1, 8)[0]))
