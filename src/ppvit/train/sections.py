"""The sections of a run's settings, one small dataclass each: which backbone, which data, which
encryption, which optimiser, which run folder. :class:`~ppvit.train.config.TrainConfig` composes them
with the method's own config; every field is a ``ppvit train`` flag of the same name (its help text is
the field's ``help`` metadata). No section re-declares another's field (checked in ``config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ppvit.data.augment import PlainAugment
from ppvit.data.sources.base import SplitNames
from ppvit.models.weights import WEIGHTS_ENV

NO_ENCRYPTION = "none"  # the one spelling of plain images in a run's settings
DEFAULT_MODEL = "vit_tiny_patch16_224"  # the recipe's ImageNet ViT-Ti/16; $PPVIT_WEIGHTS names a local copy


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class BackboneConfig:
    """Which pretrained ViT, at which input size, with which new head."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help("timm ViT name (ppvit's small ones included)"))
    weights: str | None = field(
        default=None,
        metadata=_help(f"local weights file (safetensors/PyTorch, timm keys); default model: ${WEIGHTS_ENV} if set"),
    )
    pretrained: bool | None = field(
        default=None,
        metadata=_help(
            "timm's pretrained weights, downloaded (default: yes for a timm ViT without --weights or "
            f"${WEIGHTS_ENV}; no for ppvit's small ViTs, which have none); --no-pretrained: random initialisation"
        ),
    )
    img_size: int | None = field(
        default=None,
        metadata=_help(
            "input side in pixels (default: the key file's pin, else the encrypted data's manifest, else the "
            "model's); a multiple of the patch size, pos_embed resampled"
        ),
    )
    head_init: Literal["random", "zero"] | None = field(
        default=None,
        metadata=_help(
            "the new head: random (timm's reset_classifier) or zero (no gradient reaches the backbone until the "
            "head has learnt)"
        ),
    )
    fused_attn: bool | None = field(
        default=None, metadata=_help("torch's fused attention kernel (default: on GPUs only; slower to train on CPUs)")
    )
    compile: bool | None = field(
        default=None,
        metadata=_help("torch.compile the model (default: on CUDA; off on CPUs, where it costs more than it wins)"),
    )


@dataclass
class DataConfig:
    """Where the images come from, how they are split, and how they are augmented."""

    data: str | None = field(
        default=None,
        metadata=_help(
            "ImageFolder folder/tar with train/ and test/, a Hugging Face dataset (save_to_disk folder or parquet), "
            "WebDataset shards (.tar, folder or brace pattern), `ppvit encrypt` output, or cifar10 (download); "
            "default $PPVIT_CIFAR10"
        ),
    )
    image_column: str | None = field(
        default=None, metadata=_help("Hugging Face dataset: the image column (default: the Image feature)")
    )
    label_column: str | None = field(
        default=None, metadata=_help("Hugging Face dataset: the label column (default: the ClassLabel feature)")
    )
    splits: SplitNames | None = field(
        default=None,
        metadata=_help(
            "which of the source's splits are ppvit's train and test, e.g. train=training,test=holdout or "
            "test=validation (folders, Hugging Face splits or shard name prefixes; the others are left out); "
            "default: train/ and test/ (else validation/, val/... as test)"
        ),
    )
    loader_workers: int = field(
        default=0,
        metadata=_help("`ppvit encrypt --format wds` data: processes reading the shards (0: the training process)"),
    )
    val_fraction: float = field(default=0.1, metadata=_help("share of the training set held out for model selection"))
    part: str | None = field(
        default=None, metadata=_help("'i/k': train on the i-th of k disjoint stratified parts of the training set")
    )
    train_subset: int | None = field(default=None, metadata=_help("use only this many training images"))
    test_subset: int | None = field(default=None, metadata=_help("evaluate on only this many test images"))
    augment: PlainAugment = field(
        default="none", metadata=_help("plain-image augmentation before encryption (crop-flip)")
    )
    mixup: float = field(default=0.0, metadata=_help("mixup alpha (ciphertext-safe); 0 disables"))
    cutmix: float = field(default=0.0, metadata=_help("block-aligned cutmix alpha (ciphertext-safe); 0 disables"))
    device_data: bool | None = field(
        default=None,
        metadata=_help("keep the uint8 images on the training device, a batch one gather there (default: on CUDA)"),
    )
    data_seed: int | None = field(
        default=None,
        metadata=_help("seed for the training subset, validation split, data order and augmentation (default: seed)"),
    )
    strict: bool = field(
        default=False,
        metadata=_help(
            "stop at the first image that does not decode (default: leave it out, name it at the end, exit 1)"
        ),
    )

    def __post_init__(self) -> None:
        self.splits = SplitNames.of(self.splits)  # a flag's text, config.yaml's mapping: one typed value


@dataclass
class CryptoConfig:
    """How the images are encrypted, and with which key (a file; only its fingerprint is recorded)."""

    scheme: str | None = field(
        default=None,
        metadata=_help(
            "encryption scheme, e.g. shuffle+scramble; none for plain images (default: the key file's pin, else "
            "the encrypted data's manifest, else shuffle)"
        ),
    )
    key: str | None = field(default=None, metadata=_help("key file (needed when this process encrypts)"))
    block_size: int | None = field(
        default=None,
        metadata=_help(
            "encryption block size (default: the key file's pin, else the encrypted data's manifest, else the "
            "model's patch size)"
        ),
    )
    key_init: bool = field(
        default=False, metadata=_help("key holder only: start from the backbone transformed with the key")
    )

    def __post_init__(self) -> None:
        if self.scheme in ("", "plain"):  # an empty flag, a decrypted folder's word: one spelling
            self.scheme = NO_ENCRYPTION  # (None: not given, settled by TrainConfig.resolved)

    @property
    def encrypted(self) -> bool:
        return self.scheme != NO_ENCRYPTION


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, mixed precision, clipping, accumulation."""

    epochs: int = field(default=10, metadata=_help("training epochs"))
    batch_size: int = field(default=64, metadata=_help("global batch size (split evenly across processes)"))
    lr: float | None = field(default=None, metadata=_help("peak learning rate (AdamW)"))
    patch_embed_lr_scale: float | None = field(
        default=None, metadata=_help("learning-rate multiplier for the patch embedding")
    )
    weight_decay: float = field(default=0.05, metadata=_help("AdamW weight decay (not on biases, norms, embeddings)"))
    warmup_epochs: float = field(default=1.0, metadata=_help("linear warm-up, then cosine decay to 0"))
    label_smoothing: float = field(default=0.1, metadata=_help("label smoothing"))
    clip_grad: float | None = field(default=1.0, metadata=_help("gradient-norm clipping (0 to disable)"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata=_help("mixed precision; auto: bf16 on GPUs, and on CPUs where it measures faster")
    )


@dataclass
class RunConfig:
    """The run folder, the initialisation seed, checkpoint cadence and output verbosity."""

    out: str = field(default="runs/run", metadata=_help("run folder (checkpoints, metrics, adapter)"))
    seed: int = field(default=0, metadata=_help("seed for the new head and adapter initialisation (and data_seed)"))
    save_every_steps: int | None = field(default=None, metadata=_help("also checkpoint every N optimiser steps"))
    dist_timeout_s: float = field(
        default=60.0,
        metadata=_help(
            "several processes: seconds a process waits for the others in a collective before it gives up (a peer "
            "died or hangs); raise it if one process can be busy that long alone (a large checkpoint, a slow disk)"
        ),
    )
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = field(
        default="none",
        metadata=_help("also log each epoch's metrics to this tracker through Accelerate (its library installed)"),
    )
    quiet: bool = field(default=False, metadata=_help("no progress bar"))
    log_every_steps: int | None = field(
        default=None,
        metadata=_help(
            "steps between reading the loss to the host (and checking it is finite): a GPU waits at each read "
            "(default: 1 on CPUs, 50 on CUDA)"
        ),
    )


SECTIONS: dict[str, type] = {
    "backbone": BackboneConfig,
    "data": DataConfig,
    "crypto": CryptoConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
# Old flat names of method settings (config files and flags before the schema): new name.
