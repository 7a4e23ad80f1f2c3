"""Fine-tuning and evaluation on encrypted (or plain) images: one loop, read top to bottom.

Accelerate places the model, runs bf16 autocast on the CPU (AMP on a GPU), accumulates
gradients and wraps the model for multi-process data-parallel training (``accelerate
launch`` or ``torchrun``; gloo on CPUs). Batches are drawn by hand from an in-memory uint8
array (``get_batch``): the order of epoch ``e`` is a permutation seeded by ``(data_seed, e)``
and each global batch is split into equal contiguous shards, one per process, so one
process with batch B and two with B/2 each see the same images, and a resumed run sees
exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from tqdm.auto import tqdm

from ._io import atomic_write, atomic_write_text
from .adapters import AdapterMeta, file_sha256, load_adapter, save_adapter, trainable_tensors
from .backbones import create_backbone, input_size, normalization, patch_size
from .ciphers import BlockCipher, Scheme
from .data import ArrayDataset, BatchPipeline, PlainAugment, load_splits, mix_batch
from .dataset_io import decode
from .keys import Key
from .methods import MethodConfig, apply_method, method_config
from .model_transform import transform_model

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    out: str = field(default="runs/run", metadata={"help": "run folder (checkpoints, metrics, adapter)"})
    data: str | None = field(
        default=None,
        metadata={
            "help": "ImageFolder folder/tar with train/ and test/, `ppvit encrypt` output, or cifar10 (download); "
            "default $PPVIT_CIFAR10"
        },
    )
    model: str = field(
        default="vit_tiny_d6_patch4_32", metadata={"help": "timm ViT name or a ppvit small configuration"}
    )
    weights: str | None = field(default=None, metadata={"help": "local weights file (safetensors/PyTorch, timm keys)"})
    pretrained: bool = field(default=False, metadata={"help": "download timm's pretrained weights (needs the network)"})
    method: str = field(default="lora-pe", metadata={"help": "full, linear, melo or lora-pe"})
    rank: int | None = field(default=None, metadata={"help": "LoRA rank (method default 4)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha/rank)"})
    lora_targets: str | None = field(default=None, metadata={"help": "qv, qkv or all"})
    train_pos_embed: bool = field(default=False, metadata={"help": "also train the position embedding"})
    train_cls_token: bool = field(default=False, metadata={"help": "also train the class token"})
    patch_embed_init: Literal["pretrained", "random"] | None = field(
        default=None,
        metadata={"help": "pretrained (default) or random: start the trainable patch embedding at random"},
    )
    head_init: Literal["random", "zero"] = field(
        default="random",
        metadata={
            "help": "the new head: random (timm's reset_classifier) or zero (no gradient reaches the backbone "
            "until the head has learnt)"
        },
    )
    scheme: str | None = field(
        default="shuffle", metadata={"help": "encryption scheme, e.g. shuffle+scramble; none for plain images"}
    )
    key: str | None = field(default=None, metadata={"help": "key file (needed when this process encrypts)"})
    block_size: int | None = field(
        default=None, metadata={"help": "encryption block size (default: the model's patch size)"}
    )
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "global batch size (split across processes)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    patch_embed_lr_scale: float = field(
        default=1.0, metadata={"help": "learning-rate multiplier for the patch embedding"}
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on biases, norms, embeddings)"}
    )
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up, then cosine decay to 0"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    clip_grad: float | None = field(default=1.0, metadata={"help": "gradient-norm clipping (none to disable)"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "mixed precision; auto: bf16 on GPUs, and on CPUs where it measures faster"}
    )
    augment: PlainAugment = field(
        default="none", metadata={"help": "plain-image augmentation before encryption (crop-flip)"}
    )
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (ciphertext-safe); 0 disables"})
    cutmix: float = field(default=0.0, metadata={"help": "block-aligned cutmix alpha (ciphertext-safe); 0 disables"})
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the training set held out for model selection"}
    )
    part: str | None = field(
        default=None, metadata={"help": "'i/k': train on the i-th of k disjoint stratified parts of the training set"}
    )
    train_subset: int | None = field(default=None, metadata={"help": "use only this many training images (smoke runs)"})
    test_subset: int | None = field(default=None, metadata={"help": "evaluate on only this many test images"})
    key_init: bool = field(
        default=False, metadata={"help": "key holder only: start from the backbone transformed with the key"}
    )
    fused_attn: bool | None = field(
        default=None,
        metadata={"help": "use torch's fused attention kernel (default: on GPUs only; slower to train on CPUs)"},
    )
    seed: int = field(default=0, metadata={"help": "seed for the new head and adapter initialisation (and data_seed)"})
    data_seed: int | None = field(
        default=None,
        metadata={
            "help": "seed for the training subset, validation split, data order and augmentation (default: seed)"
        },
    )
    save_every_steps: int | None = field(default=None, metadata={"help": "also checkpoint every N optimiser steps"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """A config from YAML, with ``overrides`` (e.g. command-line flags) taking precedence."""
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"config file {path}: cannot be read ({exc})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"config file {path}: unknown settings {', '.join(unknown)}")
        return cls(**{**doc, **overrides})

    def method_config(self) -> MethodConfig:
        return method_config(
            self.method,
            rank=self.rank,
            alpha=self.alpha,
            targets=self.lora_targets,
            train_pos_embed=self.train_pos_embed,
            train_cls_token=self.train_cls_token,
            patch_embed_init=self.patch_embed_init,
        )

    @property
    def encrypted(self) -> bool:
        return self.scheme not in (None, "", "none", "plain")


# -- building blocks --------------------------------------------------------------------------


def build_model(cfg: TrainConfig, num_classes: int, cipher: BlockCipher | None = None) -> torch.nn.Module:
    """The backbone (same frozen weights on every call) with the method applied and a new head.

    With ``key_init`` (the key holder's case) the backbone is first transformed with the key,
    so training starts from a model that is exact on the encrypted images.
    """
    torch.manual_seed(cfg.seed)  # random-init backbones and new heads are reproducible
    model = create_backbone(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained, weights=cfg.weights)
    model.reset_classifier(num_classes)
    if cfg.head_init == "zero":
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    elif cfg.head_init != "random":
        raise ValueError(f"head_init must be random or zero, got {cfg.head_init!r}")
    fused = cfg.fused_attn if cfg.fused_attn is not None else torch.cuda.is_available()
    for block in model.blocks:
        block.attn.fused_attn = fused
    if cfg.key_init:
        if cipher is None:
            raise ValueError("--key-init needs the key and an encrypting run (--key, a scheme, plain data)")
        transform_model(model, cipher.key, cipher.scheme, cipher.block_size)
    return apply_method(model, cfg.method_config())


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D tensors and embeddings; the patch embedding's own lr."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token", "reg_token"))
        groups.setdefault(("patch_embed." in name, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": cfg.lr * (cfg.patch_embed_lr_scale if pe else 1.0),
            "weight_decay": cfg.weight_decay * decay,
        }
        for (pe, decay), ps in sorted(groups.items())
    ]


def get_lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: fixed by (seed, epoch), so a resumed run repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def get_batch(ds: ArrayDataset, index: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's contiguous share of one global batch."""
    shard = index.chunk(world)[rank].numpy()
    return torch.from_numpy(ds.images[shard]), torch.from_numpy(ds.labels[shard])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, ds: ArrayDataset, pipeline: BatchPipeline, batch_size: int, accelerator: Accelerator
) -> dict[str, float]:
    """Loss and accuracy over the whole of ``ds``, summed across processes."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, count
    order = torch.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        images, labels = get_batch(
            ds, order[start : start + batch_size], accelerator.process_index, accelerator.num_processes
        )
        if len(labels) == 0:
            continue
        labels = labels.to(accelerator.device)
        with accelerator.autocast():
            logits = model(pipeline(images.to(accelerator.device), train=False))
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
    totals = accelerator.reduce(totals, reduction="sum")
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2]), "n": int(totals[2])}


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """One file, written to a temporary name and renamed: never a half-written checkpoint."""
    payload = {"model": trainable_tensors(model), "optimizer": optimizer.state_dict(), **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path}: cannot be read ({exc.__class__.__name__})") from None
    missing = set(trainable_tensors(model)) ^ set(payload["model"])
    if missing:
        raise ValueError(f"checkpoint {path}: does not match this run's method ({sorted(missing)[:3]} ...)")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in payload.pop("model").items():
            named[n].copy_(t)
    optimizer.load_state_dict(payload.pop("optimizer"))
    return payload


# -- the run -------------------------------------------------------------------------------------


def make_cipher(cfg: TrainConfig, block_size: int) -> BlockCipher | None:
    """The cipher when this process encrypts (it holds the key), else None."""
    if not cfg.encrypted:
        return None
    if cfg.key is None:
        raise ValueError("encrypting needs --key KEY (or data already encrypted with `ppvit encrypt`)")
    return BlockCipher(Key.load(cfg.key), Scheme.parse(cfg.scheme), block_size)


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 on GPUs that have it (else fp16); on a CPU, bf16 only if it measures faster.

    Why measure: CPUs differ. One machine here multiplied bf16 matrices 2.6x faster than fp32
    (370 vs 140 GFLOP/s), another, with AVX-512 but no AMX, 2x slower (167 vs 330); BENCHMARKS.md.
    """
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_speedup() > 1.25 else "no"


@functools.cache
def cpu_bf16_speedup(n: int = 1024, reps: int = 5) -> float:
    """fp32 time over bf16 time of an n x n matrix multiply on this CPU (best of ``reps``)."""

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def train(
    cfg: TrainConfig, resume: bool = False, on_step: Callable[[int, torch.nn.Module], None] | None = None
) -> dict[str, Any]:
    """Fine-tune, select the epoch with the best validation accuracy, report on the test set.

    ``on_step(step, model)`` is called on the main process after every optimiser step with the
    unwrapped model (e.g. to watch a tensor as training proceeds, as ``ppvit.audit`` does).
    """
    out = Path(cfg.out)
    # Accelerate keeps its precision in a process-wide singleton; a second run in one process
    # (a notebook, `ppvit reproduce`) may want another. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True where there is no GPU: Accelerate only then runs several CPU processes (gloo).
    precision = resolve_precision(cfg.precision)
    accelerator = Accelerator(
        mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available()
    )
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _check_resume(out, cfg, resume)

    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    splits = load_splits(cfg.data, cfg.val_fraction, data_seed, cfg.part, cfg.train_subset, cfg.test_subset)
    with torch.device("meta"):  # geometry only: no memory, no initialisation
        probe = create_backbone(cfg.model, num_classes=0)
    block, side = cfg.block_size or patch_size(probe), input_size(probe)
    if splits.encrypted:  # the server's case: ciphertext on disk, checked against this run
        fingerprint = Key.load(cfg.key).fingerprint if cfg.key else None
        splits.manifest.check(scheme=cfg.scheme, block_size=block, size=side, fingerprint=fingerprint)
        cipher = None
    else:
        cipher = make_cipher(cfg, block)
    model = build_model(cfg, len(splits.train.classes), cipher)
    mean, std = normalization(model)
    pipeline = BatchPipeline(input_size(model), mean, std, cipher, splits.encrypted, cfg.augment)

    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    steps_per_epoch = len(splits.train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set ({len(splits.train)} images)")
    total_steps = steps_per_epoch * cfg.epochs // cfg.grad_accum
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch / cfg.grad_accum))
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    ckpt = out / "checkpoint.pt"
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_val_acc": -1.0, "history": []}
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer)
        log.info("resumed %s at epoch %d, step %d", out, state["epoch"], state["step"])

    unwrapped = accelerator.unwrap_model(model)
    if main:  # written once the run's inputs have been checked: it marks the folder as this run's
        atomic_write_text(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        order = epoch_order(len(splits.train), data_seed, epoch)
        first = state["step"] - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
        sums = {"loss": 0.0, "correct": 0.0, "n": 0.0} | state.pop("partial", {})
        bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=cfg.quiet or not main)
        t0 = time.perf_counter()
        for i in bar:
            step = epoch * steps_per_epoch + i
            gen = torch.Generator().manual_seed(data_seed * 1_000_003 + step * 97 + rank)
            images, labels = get_batch(splits.train, order[i * cfg.batch_size : (i + 1) * cfg.batch_size], rank, world)
            images, labels = images.to(accelerator.device), labels.to(accelerator.device)
            x, target = mix_batch(
                pipeline(images, train=True, generator=gen),
                labels,
                len(splits.train.classes),
                cfg.mixup,
                cfg.cutmix,
                block,
                gen,
            )
            with accelerator.accumulate(model):
                for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    g["lr"] = lr * get_lr_scale(step // cfg.grad_accum, total_steps, warmup)
                with accelerator.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; stopped. Last good checkpoint: "
                        f"{ckpt if ckpt.exists() else 'none'}. Try a lower --lr or --patch-embed-lr-scale."
                    )
                accelerator.backward(loss)
                if cfg.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if on_step is not None and main and accelerator.sync_gradients:
                    on_step((step + 1) // cfg.grad_accum, unwrapped)
            n = len(labels)
            sums["loss"] += loss.item() * n
            sums["correct"] += (logits.argmax(1) == labels).sum().item()
            sums["n"] += n
            rate = sums["n"] * world / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(
                loss=f"{sums['loss'] / sums['n']:.3f}", acc=f"{sums['correct'] / sums['n']:.3f}", ips=f"{rate:.0f}"
            )
            if cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0 and i + 1 < steps_per_epoch and main:
                save_checkpoint(
                    ckpt, unwrapped, optimizer, {**state, "epoch": epoch, "step": step + 1, "partial": sums}
                )
        seconds = time.perf_counter() - t0
        val = evaluate(model, splits.val, pipeline, cfg.batch_size, accelerator)
        train_stats = accelerator.reduce(
            torch.tensor([sums["loss"], sums["correct"], sums["n"]], dtype=torch.float64, device=accelerator.device),
            reduction="sum",
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": float(train_stats[0] / train_stats[2]),
            "train_acc": float(train_stats[1] / train_stats[2]),
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": float(train_stats[2]) / seconds,
            "seconds": seconds,
        }
        state["history"].append(row)
        state["epoch"], state["step"] = epoch + 1, (epoch + 1) * steps_per_epoch
        if main:
            if val["acc"] > state["best_val_acc"]:
                state["best_val_acc"] = val["acc"]
                state["best_epoch"] = epoch + 1
                atomic_write(out / "best.pt", lambda tmp: torch.save(trainable_tensors(unwrapped), tmp))
            save_checkpoint(ckpt, unwrapped, optimizer, state)
            _write_metrics(out, state["history"])
            log.info(
                "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f img/s",
                epoch + 1,
                row["train_loss"],
                row["train_acc"],
                row["val_loss"],
                row["val_acc"],
                row["images_per_s"],
            )
        accelerator.wait_for_everyone()

    # the test set is touched once, with the epoch chosen on validation data
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    named = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for n, t in best.items():
            named[n].copy_(t)
    test = evaluate(model, splits.test, pipeline, cfg.batch_size, accelerator)
    if main:
        save_adapter(unwrapped, adapter_meta(cfg, splits.train.classes, cipher, splits.manifest), out / "adapter")
    result = {
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_images": test["n"],
        "best_epoch": state.get("best_epoch"),
        "best_val_acc": state["best_val_acc"],
        "epochs": cfg.epochs,
        "method": cfg.method,
        "scheme": str(Scheme.parse(cfg.scheme)) if cfg.encrypted else "plain",
        "num_classes": len(splits.train.classes),
        "trainable_params": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "train_seconds": sum(r["seconds"] for r in state["history"]),
        "images_per_s": float(np.mean([r["images_per_s"] for r in state["history"]])) if state["history"] else None,
        "peak_rss_mb": _peak_rss_mb(),
        "processes": world,
        "precision": precision,
    }
    if main:
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def adapter_meta(
    cfg: TrainConfig, classes: tuple[str, ...], cipher: BlockCipher | None, manifest: Any | None
) -> AdapterMeta:
    """What the adapter must remember: base model, method, classes, and the encryption (no key)."""
    scheme = block = fingerprint = None
    if cipher is not None:
        scheme, block, fingerprint = str(cipher.scheme), cipher.block_size, cipher.key.fingerprint
    elif manifest is not None:
        scheme, block, fingerprint = manifest.scheme, manifest.block_size, manifest.key_fingerprint
    return AdapterMeta(
        model=cfg.model,
        num_classes=len(classes),
        method=cfg.method_config().to_dict(),
        classes=list(classes),
        weights_sha256=file_sha256(cfg.weights) if cfg.weights else None,
        pretrained=cfg.pretrained,
        init_seed=None if (cfg.weights or cfg.pretrained) else cfg.seed,
        scheme=scheme,
        block_size=block,
        key_fingerprint=fingerprint,
        key_init=cfg.key_init,
    )


def _check_resume(out: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse to mix two runs in one folder; on resume, the saved config must match."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    if not resume:
        raise ValueError(f"run folder {out}: already holds a run; pass --resume to continue it or choose another --out")
    old = yaml.safe_load(saved.read_text())
    new = dataclasses.asdict(cfg)
    changed = [k for k in new if k not in ("quiet",) and old.get(k) != new[k]]
    if changed:
        raise ValueError(f"run folder {out}: --resume with different settings ({', '.join(changed)})")


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    On Linux, VmHWM of /proc/self/status: the high-water mark of this process's own memory.
    Not ``ru_maxrss``: a child started by fork and exec inherits its parent's peak there, so
    every `ppvit reproduce` cell reported the parent's 2.2 GB (the pretraining) as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux KiB, macOS bytes
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _write_metrics(out: Path, history: list[dict[str, float]]) -> None:
    """metrics.jsonl (one line per epoch) and curves.png."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax1.set(xlabel="epoch", ylabel="loss")
    ax2.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax2.plot(epochs, [r["val_acc"] for r in history], label="val")
    ax2.set(xlabel="epoch", ylabel="accuracy")
    ax1.legend()
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# -- using a trained adapter ---------------------------------------------------------------------


def _adapter_pipeline(
    meta: AdapterMeta, model: torch.nn.Module, key: Key | None, data_encrypted: bool
) -> BatchPipeline:
    """The input pipeline an adapter expects: encrypt here with the key, or take ciphertext as it is."""
    cipher = None
    if meta.scheme is not None and not data_encrypted:
        if key is None:
            raise ValueError(
                f"this model was trained on images encrypted with scheme {meta.scheme}: pass --key to encrypt "
                "plain inputs, or give inputs encrypted with `ppvit encrypt`"
            )
        if key.fingerprint != meta.key_fingerprint:
            raise ValueError(f"key fingerprint {key.fingerprint} is not the adapter's ({meta.key_fingerprint})")
        cipher = BlockCipher(key, meta.scheme, meta.block_size)
    mean, std = normalization(model)
    return BatchPipeline(input_size(model), mean, std, cipher, data_encrypted)


def evaluate_adapter(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike | None,
    key: Key | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int = 256,
    subset: int | None = None,
) -> dict[str, float]:
    """Test-set loss and accuracy of a saved adapter on plain (encrypted here) or encrypted data."""
    model, meta = load_adapter(adapter_dir, weights)
    splits = load_splits(data, 0.5, 0, test_subset=subset)
    if splits.encrypted:
        splits.manifest.check(meta.scheme, meta.block_size, input_size(model), meta.key_fingerprint, where=str(data))
    pipeline = _adapter_pipeline(meta, model, key, splits.encrypted)
    return evaluate(model, splits.test, pipeline, batch_size, Accelerator(cpu=not torch.cuda.is_available()))


@torch.no_grad()
def predict_files(
    adapter_dir: str | os.PathLike,
    files: list[str],
    key: Key | None = None,
    encrypted: bool = False,
    weights: str | os.PathLike | None = None,
) -> list[tuple[str, str, float]]:
    """(file, predicted class, probability) per image file; plain files are resized then encrypted."""
    model, meta = load_adapter(adapter_dir, weights)
    pipeline = _adapter_pipeline(meta, model, key, encrypted)
    size, arrays = input_size(model), []
    for f in files:
        try:
            item = decode(f, Path(f).read_bytes())
        except OSError as exc:
            raise ValueError(f"image {f}: cannot be read ({exc.strerror})") from None
        if item.error:
            raise ValueError(f"image {f}: {item.error}")
        image = item.image
        if image.size != (size, size):
            if encrypted:
                raise ValueError(f"image {f}: is {image.size[0]}x{image.size[1]}, the model takes {size}x{size}")
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(torch.from_numpy(np.asarray(image).copy()))
    probs = model.eval()(pipeline(torch.stack(arrays), train=False)).softmax(-1)
    classes = meta.classes or [str(i) for i in range(meta.num_classes)]
    return [(f, classes[int(p.argmax())], float(p.max())) for f, p in zip(files, probs, strict=True)]
