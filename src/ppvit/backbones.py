"""timm Vision Transformers by name: ImageNet weights online, a local file offline, or random.

ppvit adds no model class of its own. Small CPU configurations are timm models with other
arguments (patch 4 on 32x32 inputs, fewer blocks), registered here as data under names
that carry their settings, the way timm names its models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from safetensors import safe_open
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer

DEFAULT_MODEL = "vit_base_patch16_224"


@dataclass(frozen=True)
class SmallBackbone:
    """A CPU-sized ViT: a timm architecture plus the arguments that shrink it."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    help: str = ""


SMALL_BACKBONES: dict[str, SmallBackbone] = {
    "vit_tiny_d6_patch4_32": SmallBackbone(
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, depth=6),
        "ViT-Tiny geometry (dim 192, 3 heads), 6 blocks, 4x4 patches on 32x32 inputs: the CPU preset",
    ),
    "vit_tiny_d12_patch4_32": SmallBackbone(
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4),
        "ViT-Tiny, all 12 blocks, 4x4 patches on 32x32 inputs",
    ),
    "vit_micro_d2_patch4_32": SmallBackbone(
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3),
        "a 2-block, 48-dim ViT for tests and smoke runs",
    ),
}


def create_backbone(
    name: str = DEFAULT_MODEL,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """Build a timm ViT.

    ``pretrained=True`` downloads timm's default weights (needs the network);
    ``weights=PATH`` loads a local safetensors or PyTorch file with timm key names instead
    (through timm's ``pretrained_cfg_overlay``, so timm adapts the head and position
    embeddings exactly as for downloaded weights). ``None`` kwargs are dropped so that a
    CLI default of ``None`` means "the model's own default", as in ``timm.create_model``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    timm_name = name
    if name in SMALL_BACKBONES:
        timm_name = SMALL_BACKBONES[name].timm_name
        kwargs = {**SMALL_BACKBONES[name].kwargs, **kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path}: not found")
        # Tell timm the file's own head size, so that it keeps a matching head and replaces
        # only a mismatched one (it compares this with num_classes).
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path), num_classes=_head_classes(path))
        pretrained = True
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        src = f"weights file {weights}" if weights is not None else f"model {name}"
        raise ValueError(f"{src}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model {name}: ppvit needs a timm VisionTransformer, got {type(model).__name__}")
    return model


def _head_classes(path: Path) -> int:
    """The number of classes of the ``head.weight`` stored in a weights file (0 when headless)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice("head.weight").get_shape()[0] if "head.weight" in f.keys() else 0  # noqa: SIM118
        state = load_state_dict(str(path))
    except Exception as exc:  # any unreadable file: one clear line
        raise ValueError(f"weights file {path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    return int(state["head.weight"].shape[0]) if "head.weight" in state else 0


def input_size(model: nn.Module) -> int:
    """The square input side the model's patch embedding expects (timm keeps it on the module)."""
    h, w = model.patch_embed.img_size
    if h != w:
        raise ValueError(f"ppvit needs square inputs, the model expects {h}x{w}")
    return int(h)


def patch_size(model: nn.Module) -> int:
    """The ViT patch size: the block size that encryption must match."""
    ph, pw = model.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"ppvit needs square patches, the model has {ph}x{pw}")
    return int(ph)


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model was trained with, from its pretrained config."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))


def available_models() -> list[str]:
    """ppvit's small configurations followed by every timm ViT name."""
    return [*SMALL_BACKBONES, *timm.list_models("vit_*")]
