"""The methods' settings, one small dataclass each (as PEFT's ``LoraConfig``), and their registry.

Apart from :mod:`ppvit.models.methods` (which builds them on torch and PEFT) so that the
training schema, the CLI's flags and ``--help`` read them without importing torch. A new
method is one config class here plus its branch in :func:`ppvit.models.methods.apply_method`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from ppvit._schema import check_fields

LoraTargets = Literal["qv", "qkv", "all"]


@dataclass
class MethodConfig:
    """What trains besides the new head. Subclasses set ``name`` and their defaults."""

    name: ClassVar[str] = ""
    # The training recipe a run of this method gets unless told otherwise: ImageNet ViT-Ti/16 on
    # CIFAR-10 at 112 px (RESULTS.md), also the demo/cpu/gpu presets' settings.
    recipe: ClassVar[dict[str, Any]] = {}
    train_patch_embed: bool = field(default=False, metadata={"help": "train the patch embedding (weight and bias)"})
    train_pos_embed: bool = field(default=False, metadata={"help": "train the position embedding"})
    train_cls_token: bool = field(default=False, metadata={"help": "train the class token"})
    patch_embed_init: Literal["pretrained", "random"] = field(
        default="pretrained",
        metadata={"help": "start a trainable patch embedding from the pretrained weights or at random"},
    )

    def __post_init__(self) -> None:
        # types first (Literal values too): an adapter's "rank": "x" was a '<' TypeError
        check_fields(self, f"method {self.name}: ")
        if self.patch_embed_init == "random" and not (self.train_patch_embed or self.name == "full"):
            raise ValueError("a random patch embedding must be trained: use it with lora-pe or full")

    def to_dict(self) -> dict[str, Any]:
        """As recorded in an adapter's config: the method's name and every setting."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass
class FullConfig(MethodConfig):
    """Every parameter trains: the patch embedding, position embedding and class token with the rest."""

    name: ClassVar[str] = "full"
    recipe: ClassVar[dict[str, Any]] = {"lr": 1e-4, "head_init": "random", "patch_embed_lr_scale": 1.0}
    train_patch_embed: bool = True
    train_pos_embed: bool = True
    train_cls_token: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # implied, whatever a file written before this record says (it recorded False)
        self.train_patch_embed = self.train_pos_embed = self.train_cls_token = True


@dataclass
class LinearConfig(MethodConfig):
    """Linear probing: a new head on frozen features."""

    name: ClassVar[str] = "linear"
    recipe: ClassVar[dict[str, Any]] = {"lr": 1e-2, "head_init": "zero", "patch_embed_lr_scale": 1.0}


@dataclass
class MeloConfig(MethodConfig):
    """MeLo: LoRA on the q and v projections, a new head, everything else frozen."""

    name: ClassVar[str] = "melo"
    recipe: ClassVar[dict[str, Any]] = {"lr": 3e-3, "head_init": "zero", "patch_embed_lr_scale": 1.0}
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; scale alpha/r (default r: scale 1)"})
    targets: LoraTargets = field(default="qv", metadata={"help": "qv (MeLo), qkv (whole fused layer) or all linear"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha is not None:
            self.alpha = float(self.alpha)  # YAML may give an int
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):  # nan passed a `<= 0` test
            raise ValueError(f"LoRA alpha must be positive and finite, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def lora_alpha(self) -> float:
        """alpha, or the rank when unset (scale 1): a later change of rank keeps scale 1."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class LoraPEConfig(MeloConfig):
    """The paper's method: MeLo plus a trainable patch embedding."""

    name: ClassVar[str] = "lora-pe"
    # the patch embedding at 0.1x the rate: +5.6 points on shuffled images over 1x (3 seeds, RESULTS.md)
    recipe: ClassVar[dict[str, Any]] = {"lr": 3e-3, "head_init": "zero", "patch_embed_lr_scale": 0.1}
    train_patch_embed: bool = field(default=True, metadata={"help": "train the patch embedding (weight and bias)"})


METHODS: dict[str, type[MethodConfig]] = {c.name: c for c in (FullConfig, LinearConfig, MeloConfig, LoraPEConfig)}


def method_config(name: str, **overrides: Any) -> MethodConfig:
    """The config of method ``name``; ``None`` overrides mean "the method's default"."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in fields(cls)}
    given = {k: v for k, v in overrides.items() if v is not None}
    lora_only = sorted(k for k in given if k not in known)
    if lora_only:
        raise ValueError(f"method {name} takes no {', '.join(lora_only)} (LoRA settings need melo or lora-pe)")
    return cls(**given)
