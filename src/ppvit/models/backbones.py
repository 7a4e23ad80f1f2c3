"""timm Vision Transformers by name: ImageNet weights online, a local file offline, or random.

ppvit adds no model class of its own. Small CPU configurations are timm's VisionTransformer
with other arguments (patch 4 on 32x32 inputs, fewer blocks), registered in timm's registry
under names that carry their settings, the way timm names its models.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ppvit.models.weights import check_weights_file, read_state_dict, tensor_shapes, weights_mismatch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "vit_base_patch16_224"

# ppvit's CPU-sized ViTs: ViT-Tiny (dim 192, 3 heads) with other arguments, registered in
# timm's own registry on ``import ppvit`` so that plain ``timm.create_model`` builds them.
SMALL_VITS: dict[str, tuple[dict[str, Any], str]] = {
    "vit_tiny_d6_patch4_32": (
        dict(img_size=32, patch_size=4, depth=6),
        "ViT-Tiny geometry, 6 blocks, 4x4 patches on 32x32 inputs: the self-pretrained CPU presets",
    ),
    "vit_tiny_d12_patch4_32": (dict(img_size=32, patch_size=4, depth=12), "ViT-Tiny, all 12 blocks, 4x4 patches"),
    "vit_micro_d2_patch4_32": (
        dict(img_size=32, patch_size=4, depth=2, embed_dim=48),
        "a 2-block, 48-dim ViT for tests and smoke runs",
    ),
}
default_cfgs = generate_default_cfgs(  # read by timm's register_model: mean = std = 0.5 and the head, as ViT-Tiny's
    {
        name: dict(
            url="",
            num_classes=1000,
            input_size=(3, 32, 32),
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            classifier="head",
            description=text,
        )
        for name, (_, text) in SMALL_VITS.items()
    }
)


def _small_vit(name: str) -> Callable[..., VisionTransformer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        args = {"embed_dim": 192, "num_heads": 3, **SMALL_VITS[name][0]}
        return build_model_with_cfg(
            VisionTransformer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **{**args, **kwargs}
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    return entrypoint


for _name in SMALL_VITS:
    globals()[_name] = register_model(_small_vit(_name))


LIST_MODELS = (
    "list timm's with: python -c \"import timm; print(timm.list_models('vit_*'))\"; ppvit's small ones: "
    + ", ".join(SMALL_VITS)
)


def create_backbone(
    name: str = DEFAULT_MODEL,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """Build a timm ViT.

    ``pretrained=True`` downloads timm's default weights (needs the network);
    ``weights=PATH`` loads a local safetensors or PyTorch file with timm key names instead
    (:func:`load_weights_file`: ppvit reads the file itself and only borrows timm's checkpoint
    filter, which resamples the position embeddings to ``img_size``). ``None`` arguments mean
    "the model's own default", as in ``timm.create_model``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif weights is not None:  # the file's own head, as timm.create_model keeps a downloaded one
        check_weights_file(Path(weights))
        head = tensor_shapes(Path(weights)).get("head.weight")
        kwargs["num_classes"] = head[0] if head else 0
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not timm.is_model(name):
        raise ValueError(f"model {name}: not a timm model name; ppvit needs a timm ViT ({LIST_MODELS})")
    try:  # TypeError: an argument the model does not take (an adapter's model_kwargs edited by hand)
        if weights is not None or pretrained:  # the kind of model first: weights for a ResNet would fail obscurely
            with torch.device("meta"):
                _require_vit(name, timm.create_model(name, **kwargs))
        model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"model {name}: {str(exc).splitlines()[0]}") from exc
    _require_vit(name, model)
    if img_size is not None and img_size % patch_size(model):
        raise ValueError(f"--img-size {img_size}: not a multiple of {name}'s patch size {patch_size(model)}")
    if weights is not None:
        load_weights_file(model, Path(weights), name)
    return model


def load_weights_file(model: VisionTransformer, path: Path, name: str) -> None:
    """Load a local timm state dict into ``model``, keeping ``model``'s head where the file's differs.

    Not through timm's ``pretrained_cfg_overlay=dict(file=...)``: how timm treats such a file
    changed between releases (1.0.29 handed a safetensors file to ViT's JAX ``.npz`` reader when
    the model's default weights were JAX ones), while its ``checkpoint_filter_fn`` (position
    embeddings resampled to the model's grid, old key names mapped) is stable from 1.0.3 on.
    """
    check_weights_file(path)
    state = checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):  # a new head for other classes (or none): the file's is dropped
        if k in state and (k not in own or state[k].shape != own[k].shape):
            del state[k]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # a shape differs
        missing, unexpected = ["?"], []
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        shapes = {k: tuple(v.shape) for k, v in own.items()}
        raise ValueError(f"weights file {path}: made for a different model ({weights_mismatch(path, shapes, name)})")
    log.info("weights %s loaded into %s%s", path, name, " with a new head" if missing else "")


def _require_vit(name: str, model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"model {name}: ppvit needs a timm VisionTransformer, got {type(model).__name__} ({LIST_MODELS})"
        )


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
