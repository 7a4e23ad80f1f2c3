"""Weight matching recovers a key-transformed model's permutation, and nothing from an unrelated model."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL

from ppvit.attacks.weight_matching import MapScore, weight_leakage_transformed, weight_matching_attack
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.backbones import create_backbone
from ppvit.models.transform import block_map, transform_model


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+scramble", "channel:pixel+scramble"])
def test_weight_matching_recovers_everything_from_a_key_transformed_model(scheme: str) -> None:
    key = Key.generate()
    score = weight_leakage_transformed(SMALL, key, scheme)
    assert score.pixel_permutation == 1.0
    assert score.block_permutation in (None, 1.0)
    assert (score.block_permutation is None) == ("scramble" not in scheme)


def test_weight_matching_finds_nothing_in_an_unrelated_embedding() -> None:
    torch.manual_seed(0)
    public = create_backbone(SMALL, num_classes=0)
    torch.manual_seed(1)
    other = create_backbone(SMALL, num_classes=0)
    key = Key.generate()
    truth = block_map(BlockCipher(key, "shuffle", 4).plan(32, 32), 4)
    transform_model(other, key, "shuffle")
    guess = weight_matching_attack(public.state_dict(), other.state_dict())
    assert MapScore.of(guess, truth).pixel_permutation < 0.2  # 48 columns: chance is about 1/48
