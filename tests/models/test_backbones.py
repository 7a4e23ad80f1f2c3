"""ppvit's small ViTs live in timm's own registry: plain timm builds them, with the weights ppvit built before."""

from __future__ import annotations

import timm
import torch

import ppvit.models.backbones  # noqa: F401  (registers the small ViTs with timm)
from ppvit.models.backbones import SMALL_VITS, create_backbone, normalization


def test_plain_timm_builds_every_small_vit_after_import_ppvit() -> None:
    assert set(SMALL_VITS) <= set(timm.list_models("vit_*"))
    model = timm.create_model("vit_tiny_d6_patch4_32", num_classes=10)
    assert (len(model.blocks), model.embed_dim, model.patch_embed.patch_size, model.patch_embed.img_size) == (
        6,
        192,
        (4, 4),
        (32, 32),
    )
    assert normalization(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_registered_small_vits_initialise_exactly_as_timms_vit_tiny_with_the_same_arguments() -> None:
    """The registry must not change a random-init backbone: earlier runs rebuild it from their seed."""
    for name, (kwargs, _) in SMALL_VITS.items():
        torch.manual_seed(3)
        ours = create_backbone(name, num_classes=10)
        torch.manual_seed(3)
        theirs = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
