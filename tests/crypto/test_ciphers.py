"""Ciphers against independent arithmetic: a per-block reference, exact inverses, numpy == torch."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch
from conftest import KEY, assert_no_key_material
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher, EncryptTransform, Scheme
from ppvit.crypto.keys import Key

OTHER = Key(bytes(range(1, 33)))
SCHEMES = [
    "shuffle",
    "scramble",
    "rotate",
    "negpos",
    "channel",
    "negpos:pixel",
    "channel:pixel",
    "shuffle+scramble",
    "scramble+shuffle",
    "shuffle+scramble+rotate+negpos+channel",
    "channel:pixel+negpos:pixel+shuffle",
]


def reference_encrypt(x: np.ndarray, key: Key, scheme: str, p: int) -> np.ndarray:
    """The documented semantics, one block at a time, written without ppvit's plans."""
    h, w, c = x.shape
    gh, gw = h // p, w // p
    blocks = [x[i * p : (i + 1) * p, j * p : (j + 1) * p].astype(np.int64) for i in range(gh) for j in range(gw)]
    n = len(blocks)
    orders = list(itertools.permutations(range(c)))
    for part in scheme.split("+"):
        grid = f"ppvit/v1/{part}/grid={gh}x{gw}"
        shared = f"ppvit/v1/{part}/p={p}/c={c}"
        if part == "shuffle":
            perm = key.permutation(shared, p * p * c)
            blocks = [b.reshape(-1)[perm].reshape(p, p, c) for b in blocks]
        elif part == "scramble":
            perm = key.permutation(grid, n)
            blocks = [blocks[perm[i]] for i in range(n)]
        elif part == "rotate":
            ks = key.choices(grid, n, 8)
            blocks = [
                np.rot90(b, k % 4) if k < 4 else np.rot90(b, k % 4)[:, ::-1] for b, k in zip(blocks, ks, strict=True)
            ]
        elif part == "negpos":
            bits = key.choices(grid, n, 2)
            blocks = [255 - b if bit else b for b, bit in zip(blocks, bits, strict=True)]
        elif part == "negpos:pixel":
            bits = key.choices(shared, p * p * c, 2).reshape(p, p, c).astype(bool)
            blocks = [np.where(bits, 255 - b, b) for b in blocks]
        elif part == "channel":
            ks = key.choices(grid, n, len(orders))
            blocks = [b[:, :, list(orders[k])] for b, k in zip(blocks, ks, strict=True)]
        elif part == "channel:pixel":
            ks = key.choices(shared, p * p, len(orders)).reshape(p, p)
            blocks = [np.stack([b[r, q, list(orders[ks[r, q]])] for r in range(p) for q in range(p)]) for b in blocks]
            blocks = [b.reshape(p, p, c) for b in blocks]
        else:
            raise AssertionError(part)
    out = np.zeros_like(x)
    for idx, b in enumerate(blocks):
        i, j = divmod(idx, gw)
        out[i * p : (i + 1) * p, j * p : (j + 1) * p] = b
    return out


def images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("p", "h", "w"), [(4, 32, 32), (16, 32, 48), (8, 24, 16)])
def test_matches_per_block_reference(scheme: str, p: int, h: int, w: int) -> None:
    x = images(3, h, w)
    y = BlockCipher(KEY, scheme, p).encrypt(x)
    for xi, yi in zip(x, y, strict=True):
        np.testing.assert_array_equal(yi, reference_encrypt(xi, KEY, scheme, p))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("p", [2, 4, 16])
def test_decrypt_inverts_encrypt(scheme: str, p: int) -> None:
    x = images(4, 32, 64, seed=p)
    cipher = BlockCipher(Key.generate(), scheme, p)
    y = cipher.encrypt(x)
    assert not np.array_equal(x, y)
    np.testing.assert_array_equal(cipher.decrypt(y), x)
    np.testing.assert_array_equal(cipher.encrypt(x[0]), y[0])  # HWC agrees with NHWC


@pytest.mark.parametrize("scheme", SCHEMES)
def test_numpy_and_torch_agree_bit_for_bit(scheme: str) -> None:
    x = images(3, 32, 32)
    cipher = BlockCipher(KEY, scheme, 4)
    y = cipher.encrypt(x)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ty = cipher.encrypt(t)
    assert ty.dtype == torch.uint8 and ty.shape == t.shape
    np.testing.assert_array_equal(ty.permute(0, 2, 3, 1).numpy(), y)
    assert torch.equal(cipher.decrypt(ty), t)
    assert torch.equal(cipher.encrypt(t[1]), ty[1])  # CHW agrees with NCHW
    # floats in [0, 1]: the same permutation; negpos is 1 - v
    tf = t.double() / 255
    np.testing.assert_allclose(cipher.encrypt(tf).numpy(), ty.double().numpy() / 255, atol=1e-12)
    tf32 = t.float()  # integer-valued floats with max_value=255 round-trip exactly
    assert torch.equal(cipher.decrypt(cipher.encrypt(tf32, max_value=255), max_value=255), tf32)
    assert torch.equal(cipher.encrypt(tf32, max_value=255), ty.float())


def test_shuffle_keeps_each_block_multiset_and_mixes_channels() -> None:
    x = images(1, 64, 64)[0]
    y = BlockCipher(KEY, "shuffle", 16).encrypt(x)
    moved_across_channels = 0
    for i in range(0, 64, 16):
        for j in range(0, 64, 16):
            a, b = x[i : i + 16, j : j + 16], y[i : i + 16, j : j + 16]
            np.testing.assert_array_equal(np.sort(a, axis=None), np.sort(b, axis=None))
    perm = KEY.permutation("ppvit/v1/shuffle/p=16/c=3", 768)
    moved_across_channels = int(np.sum(perm % 3 != np.arange(768) % 3))
    assert moved_across_channels > 400  # about 2/3 of 768 values change channel


def test_scramble_moves_whole_blocks() -> None:
    x = images(1, 32, 32)[0]
    y = BlockCipher(KEY, "scramble", 8).encrypt(x)
    xs = sorted(x[i : i + 8, j : j + 8].tobytes() for i in range(0, 32, 8) for j in range(0, 32, 8))
    ys = sorted(y[i : i + 8, j : j + 8].tobytes() for i in range(0, 32, 8) for j in range(0, 32, 8))
    assert xs == ys


@pytest.mark.parametrize("scheme", SCHEMES)
def test_two_keys_give_different_ciphertexts(scheme: str) -> None:
    x = images(1, 64, 64)
    a = BlockCipher(KEY, scheme, 8).encrypt(x)
    b = BlockCipher(OTHER, scheme, 8).encrypt(x)
    assert not np.array_equal(a, b)


# Recorded with ppvit 0.1.0. A change here means old ciphertexts no longer decrypt.
GOLDEN_CIPHERTEXTS = {
    "shuffle+scramble+rotate+negpos+channel": "24c24a457a4b14a5",
    "channel:pixel+negpos:pixel+shuffle": "710513417fc7cd78",
}


@pytest.mark.parametrize("scheme", list(GOLDEN_CIPHERTEXTS))
def test_golden_ciphertext(scheme: str) -> None:
    """A fixed key, scheme and image give a fixed ciphertext in every later ppvit."""
    x = (np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3) % 251).astype(np.uint8)
    y = BlockCipher(KEY, scheme, 8).encrypt(x)
    assert hashlib.sha256(y.tobytes()).hexdigest()[:16] == GOLDEN_CIPHERTEXTS[scheme]


def test_pil_and_transform() -> None:
    x = images(1, 32, 32)[0]
    cipher = BlockCipher(KEY, "shuffle", 4)
    enc = EncryptTransform(cipher)(Image.fromarray(x))
    assert isinstance(enc, Image.Image)
    np.testing.assert_array_equal(np.asarray(enc), cipher.encrypt(x))
    np.testing.assert_array_equal(np.asarray(EncryptTransform(cipher, decrypt=True)(enc)), x)
    assert_no_key_material([repr(EncryptTransform(cipher)), repr(cipher), str(cipher)], KEY)


def test_size_not_multiple_of_block_is_an_error() -> None:
    with pytest.raises(ValueError, match="30x32 is not a multiple of the block size 16"):
        BlockCipher(KEY, "shuffle", 16).encrypt(images(1, 30, 32))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shufle", "unknown scheme step 'shufle'"),
        ("shuffle+shuffle", "names shuffle twice"),
        ("rotate:pixel", "rotate takes no mode"),
        ("negpos:row", "negpos takes block or pixel"),
    ],
)
def test_bad_schemes(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scheme.parse(text)


def test_scheme_canonical_form_and_absorbable() -> None:
    assert str(Scheme.parse(" Shuffle + negpos:block + channel:pixel ")) == "shuffle+negpos+channel:pixel"
    assert Scheme.parse("shuffle+scramble+negpos:pixel+channel:pixel").absorbable
    for per_block in ("rotate", "negpos", "channel"):
        assert not Scheme.parse(f"shuffle+{per_block}").absorbable


def test_negpos_needs_max_value_for_other_integer_dtypes() -> None:
    cipher = BlockCipher(KEY, "negpos", 4)
    with pytest.raises(ValueError, match="max_value"):
        cipher.encrypt(images(1, 8, 8).astype(np.int32))
    x = images(1, 8, 8).astype(np.int32)
    np.testing.assert_array_equal(cipher.encrypt(x, max_value=255), cipher.encrypt(x.astype(np.uint8)))
