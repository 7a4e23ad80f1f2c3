"""The known-plaintext attack recovers keys it should, and can fail: ties, too few pairs, another key."""

from __future__ import annotations

import numpy as np
import pytest
from attack_images import noise

from ppvit.attacks.known_plaintext import known_plaintext_attack
from ppvit.attacks.metrics import plan_accuracy, psnr
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key


@pytest.mark.parametrize(
    ("scheme", "size", "p"),
    [("shuffle", 32, 4), ("shuffle", 224, 16), ("shuffle+scramble+negpos:pixel+channel:pixel", 32, 4)],
)
def test_one_pair_recovers_an_absorbable_key_exactly(scheme: str, size: int, p: int) -> None:
    key = Key.generate()
    cipher = BlockCipher(key, scheme, p)
    pair, held = noise(1, size), noise(3, size, seed=1)
    guess = known_plaintext_attack(pair, cipher.encrypt(pair), scheme, p)
    assert plan_accuracy(guess, cipher.plan(size, size)) == 1.0
    np.testing.assert_array_equal(guess.inverse().apply_numpy(cipher.encrypt(held)), held)


def test_per_block_schemes_need_more_pairs_but_fall_too() -> None:
    scheme, key = "shuffle+scramble+rotate+negpos+channel", Key.generate()
    cipher = BlockCipher(key, scheme, 4)
    pairs = noise(8)
    truth = cipher.plan(32, 32)
    one = plan_accuracy(known_plaintext_attack(pairs[:1], cipher.encrypt(pairs[:1]), scheme, 4), truth)
    eight = plan_accuracy(known_plaintext_attack(pairs, cipher.encrypt(pairs), scheme, 4), truth)
    assert one < 0.9  # one 4x4 block of 48 values has too many ties with 256 levels
    assert eight == 1.0


def test_ties_in_flat_images_defeat_the_attack_partly() -> None:
    """A flat image gives no evidence: the attack must not do better than chance there."""
    key = Key.generate()
    cipher = BlockCipher(key, "shuffle", 4)
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    guess = known_plaintext_attack(flat, cipher.encrypt(flat), "shuffle", 4)
    assert plan_accuracy(guess, cipher.plan(32, 32)) < 0.2


def test_a_plan_recovered_for_one_key_does_not_open_another() -> None:
    pair = noise(1)
    a, b = BlockCipher(Key.generate(), "shuffle", 4), BlockCipher(Key.generate(), "shuffle", 4)
    guess = known_plaintext_attack(pair, a.encrypt(pair), "shuffle", 4)
    held = noise(2, seed=3)
    assert psnr(held, guess.inverse().apply_numpy(b.encrypt(held))) < 15


def test_refuses_pairs_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        known_plaintext_attack(noise(1), noise(1, 16), "shuffle", 4)
