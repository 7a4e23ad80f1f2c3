"""The fine-tuning methods of the paper on any timm ViT, one small config each, on HF PEFT.

``full``     every parameter trains.
``linear``   only the new head trains.
``melo``     MeLo: LoRA of rank r on the query and value projections of every block (the
             q and v slices of timm's fused ``qkv`` layer; the key slice untouched), a new
             head; patch embedding, position embedding and class token frozen.
``lora-pe``  the paper's proposal: ``melo`` plus a trainable patch embedding, which can
             re-learn the order of the shuffled pixels that a frozen one cannot undo.

PEFT cannot put LoRA on only the q and v slices of a fused ``qkv`` Linear. ppvit keeps
PEFT's LoRA layer (its forward, dropout, scaling, merge/unmerge, freezing) and registers,
through PEFT's custom-module API, :class:`QVLoraLinear`: the same layer whose A holds
``A_q`` and ``A_v`` stacked and whose B (:class:`QVLoraB`) writes ``B_q A_q x`` into the q
rows and ``B_v A_v x`` into the v rows, and nothing into the k rows. The parameter count
is MeLo's, 2·r·(d + d) per block, and PEFT's merge folds exactly that delta into ``qkv``.
PEFT's own ``get_peft_model_state_dict``/``set_peft_model_state_dict`` handle it unchanged.
A merged float32 model's outputs equal the unmerged one's within rtol = atol = 1e-5
(tests/test_methods.py checks it).

Adapters are injected with ``peft.inject_adapter_in_model``, so the model stays a timm
``VisionTransformer`` (``reset_classifier``, ``forward_features`` keep working) and every
parameter exists once: other trained parts (head, patch embedding) are unfrozen in
place rather than copied by ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from ppvit.models.backbones import create_backbone
from ppvit.models.configs import METHODS, FullConfig, MeloConfig, MethodConfig, method_config

ADAPTER = "default"


def qv_stacked(weight: torch.Tensor) -> torch.Tensor:
    """``(2, d, r)`` [B_q, B_v] as the ``(3d, 2r)`` matrix [[B_q, 0], [0, 0], [0, B_v]] (k rows zero)."""
    b_q, b_v = weight[0], weight[1]
    d, r = b_q.shape
    return torch.cat([F.pad(b_q, (0, r)), b_q.new_zeros(d, 2 * r), F.pad(b_v, (r, 0))])


class QVLoraB(nn.Module):
    """LoRA's B for a fused qkv layer: (..., 2r) -> (..., 3d) with zeros in the k rows.

    ``weight[0]`` is ``B_q`` (d x r), ``weight[1]`` is ``B_v``; the first r inputs are
    ``A_q x``, the last r are ``A_v x``.
    """

    def __init__(self, dim: int, r: int) -> None:
        super().__init__()
        self.dim, self.r = dim, r
        self.weight = nn.Parameter(torch.zeros(2, dim, r))

    def stacked(self) -> torch.Tensor:
        """The (3d, 2r) matrix [[B_q, 0], [0, 0], [0, B_v]].

        Why one matrix: a single matmul writes the (..., 3d) update directly, where two matmuls
        and a concatenation with zeros cost a measurable share of the step (BENCHMARKS.md).
        """
        return qv_stacked(self.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.stacked())

    def delta(self, a: torch.Tensor) -> torch.Tensor:
        """B @ A as a (3d, d) matrix for merging: rows [B_q A_q; 0; B_v A_v]."""
        return self.stacked() @ a


class QVLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear restricted to the q and v slices of a fused qkv projection."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if self.out_features != 3 * self.in_features:
            raise ValueError(f"q/v LoRA needs a fused qkv layer (3d x d), got {self.out_features}x{self.in_features}")
        self.lora_A[adapter_name] = nn.Linear(self.in_features, 2 * r, bias=False)
        self.lora_B[adapter_name] = QVLoraB(self.in_features, r)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter]
        dtype = b.weight.dtype
        if a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            return (b.delta(a.float()) * self.scaling[adapter]).to(dtype)  # as PEFT does for CPU half types
        return b.delta(a) * self.scaling[adapter]


def _lora_config(cfg: MeloConfig) -> LoraConfig:
    targets = {"qv": ["attn.qkv"], "qkv": ["attn.qkv"], "all": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]}
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, target_modules=targets[cfg.targets]
    )
    if cfg.targets == "qv":
        lora._register_custom_module({nn.Linear: QVLoraLinear})
    return lora


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Inject adapters and set ``requires_grad`` as the method says; returns the same model."""
    if cfg.patch_embed_init == "random":  # seeded by the caller, like the new head
        model.patch_embed.proj.reset_parameters()
    if isinstance(cfg, FullConfig):
        model.requires_grad_(True)
        return model
    if isinstance(cfg, MeloConfig):
        inject_adapter_in_model(_lora_config(cfg), model, adapter_name=ADAPTER)  # freezes all but LoRA
    else:
        model.requires_grad_(False)
    for module in (model.get_classifier(), model.patch_embed if cfg.train_patch_embed else None):
        if module is not None:
            module.requires_grad_(True)
    for flag, attr in ((cfg.train_pos_embed, "pos_embed"), (cfg.train_cls_token, "cls_token")):
        if flag:
            param = getattr(model, attr, None)
            if param is None:
                raise ValueError(f"this model has no {attr} to train")
            param.requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base Linear and drop the adapter modules (in place).

    The result is a plain timm model with no PEFT layers: its state dict has timm's keys.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


# -- parameter report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameters, each counted once."""

    method: str
    trainable: int
    total: int

    @property
    def trainable_mib(self) -> float:
        """In the paper's units: 2^20 parameters."""
        return self.trainable / 2**20


def count_params(model: nn.Module, method: str = "") -> ParamCount:
    """Counts over ``model.parameters()``, which yields each shared tensor once."""
    params = list(model.parameters())
    return ParamCount(method, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def param_report(model_name: str, num_classes: int, img_size: int | None = None, **overrides: Any) -> list[ParamCount]:
    """Build the model once per method on the meta device (no memory, no init) and count.

    ``overrides`` are method settings (rank, alpha, targets, ...), each given to the methods
    that have it; ``img_size`` matters for methods that train the position embedding.
    """
    rows = []
    for name in METHODS:
        opts = {k: v for k, v in overrides.items() if k in {f.name for f in fields(METHODS[name])}}
        with torch.device("meta"):
            model = create_backbone(model_name, num_classes=num_classes, img_size=img_size)
            rows.append(count_params(apply_method(model, method_config(name, **opts)), name))
    return rows
