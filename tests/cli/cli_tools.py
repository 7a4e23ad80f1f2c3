"""What the tests of a newcomer's second hour share (issue 29): a toy run folder, a pinned key."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import SMALL

from ppvit.crypto.keys import Geometry, Key
from ppvit.models.adapters import AdapterMeta, save_adapter
from ppvit.models.backbones import create_backbone
from ppvit.models.configs import method_config
from ppvit.models.methods import apply_method

CLASSES = [f"class{c}" for c in range(4)]  # the toy dataset's


def toy_run(
    out: Path, scheme: str | None, block: int | None, fingerprint: str | None, img_size: int | None = None
) -> Path:
    """A run folder holding a `linear` adapter of the micro ViT (random-init base, a random head large
    enough that different inputs get visibly different probabilities), as if trained with these settings."""
    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if img_size else {}
    model = apply_method(create_backbone(SMALL, num_classes=4, **kwargs), method_config("linear"))
    with torch.no_grad():
        model.head.weight.copy_(torch.randn_like(model.head.weight) * 3)
    meta = AdapterMeta(
        model=SMALL,
        num_classes=4,
        method=method_config("linear").to_dict(),
        model_kwargs=kwargs,
        classes=CLASSES,
        init_seed=0,
        scheme=scheme,
        block_size=block,
        key_fingerprint=fingerprint,
    )
    save_adapter(model, meta, out / "adapter")
    return out


def pinned_key(path: Path, scheme: str, block: int, size: int) -> Path:
    Key.generate(Geometry(scheme, block, size)).save(path)
    return path
