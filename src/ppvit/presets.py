"""Presets of the paper's comparison and `reproduce`: methods x plain/encrypted x seeds, each cell one ``train``.

A :class:`Preset` is data: a base :class:`~ppvit.config.TrainConfig` shared by every cell,
the settings each method changes (:class:`MethodSettings`), the schemes and seeds, and
where the pretrained weights come from (ImageNet weights: a local file or timm's download;
or an :class:`Upstream` pretrained here on plain images). :func:`reproduce` runs every cell
(finished cells are skipped, so a rerun continues) and writes the result table.

Each cell trains in its own spawned process through :func:`ppvit.training.train` (its peak
memory is its own, a crash stays its own); its exception comes back with type and message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from .adapters import merge_to_file
from .backbones import WEIGHTS_ENV, check_weights_file
from .config import TrainConfig
from .data import cache_dir, cifar10_path
from .keys import Key
from .results import Cell, ResultTable
from .runs import RESULT_FILE, RunResult
from .training import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upstream:
    """Pretraining on plain images: the CPU stand-in for ImageNet weights.

    It uses part 0/2 of the training set and the fine-tuning cells part 1/2 (``data.take_part``:
    a fixed stratified split), so upstream and downstream never share an image.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    train_subset: int | None = None


@dataclass(frozen=True)
class MethodSettings:
    """What one method changes in the preset's base config (None: the base's value)."""

    lr: float
    head_init: Literal["random", "zero"] | None = None
    patch_embed_lr_scale: float | None = None

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        return cfg.replace(**{k: v for k, v in asdict(self).items() if v is not None})


@dataclass(frozen=True)
class Preset:
    """One comparison: methods x data (plain, encrypted) x seeds, with shared settings."""

    name: str
    help: str
    base: TrainConfig  # the settings of every cell (model, data, optimisation)
    methods: Mapping[str, MethodSettings]
    schemes: tuple[str, ...]  # "none" is plain images
    seeds: tuple[int, ...]
    upstream: Upstream | None = None  # None: ImageNet weights (a local file or timm's download)
    weights_env: str | None = None  # the environment variable naming the local weights file
    paper: Mapping[str, float] = field(default_factory=dict)  # method -> the paper's encrypted accuracy (%)

    @property
    def model(self) -> str:
        return self.base.backbone.model

    def select(self, methods: tuple[str, ...] | None = None, **changes: object) -> Preset:
        """A copy restricted to ``methods`` (in the preset's settings) and with fields replaced."""
        if methods:
            unknown = sorted(set(methods) - set(self.methods))
            if unknown:
                raise ValueError(
                    f"preset {self.name} has no method {', '.join(unknown)}; it has {', '.join(self.methods)}"
                )
            changes["methods"] = {m: self.methods[m] for m in methods}
        return replace(self, **changes)


# The new head per method (RESULTS.md, 3 seeds each): zero for the LoRA methods and linear (with a random one,
# lora-pe on shuffled 4x4 images swung 15 points with the seed), random for full (a zero one cost it 7 points).
SMALL_TRAIN = TrainConfig.from_flat(
    model="vit_tiny_d6_patch4_32", part="1/2", batch_size=128, warmup_epochs=0.5, val_fraction=0.1, head_init="zero"
)
SMALL_METHODS = {
    "full": MethodSettings(lr=5e-4, head_init="random"),
    "linear": MethodSettings(lr=5e-3),
    "melo": MethodSettings(lr=2e-3),
    "lora-pe": MethodSettings(lr=2e-3, patch_embed_lr_scale=5.0),
}
# ImageNet ViT-Ti/16 at 112x112 (the paper's 16x16 blocks and 768-value shuffle at CPU cost): the learning rates of
# the first trial on these weights (issue 13), and lora-pe's patch embedding at 0.1x its rate (the levers study in
# RESULTS.md: +5.6 points on shuffled images over 1x, 3 seeds; the cpu table there ran at 1x); heads as above.
TI_TRAIN = TrainConfig.from_flat(
    model="vit_tiny_patch16_224", img_size=112, batch_size=64, warmup_epochs=0.3, val_fraction=0.1, head_init="zero"
)
TI_METHODS = {
    "full": MethodSettings(lr=1e-4, head_init="random"),
    "linear": MethodSettings(lr=1e-2),
    "melo": MethodSettings(lr=3e-3),
    "lora-pe": MethodSettings(lr=3e-3, patch_embed_lr_scale=0.1),
}
COMPARISON = ("none", "shuffle")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "demo",
            "ImageNet ViT-Ti/16 at 112x112 on 4,000 CIFAR-10 images, 2 epochs, one seed: the README's main job",
            TI_TRAIN.replace(epochs=2, train_subset=4_000, test_subset=2_000),
            TI_METHODS,
            COMPARISON,
            (0,),
            weights_env=WEIGHTS_ENV,
        ),
        Preset(
            "cpu",
            "ImageNet ViT-Ti/16 at 112x112, 3 epochs on 5,000 CIFAR-10 images, 2,000 test images, 3 seeds",
            TI_TRAIN.replace(epochs=3, train_subset=5_000, test_subset=2_000),
            TI_METHODS,
            COMPARISON,
            (0, 1, 2),
            weights_env=WEIGHTS_ENV,
        ),
        Preset(
            "gpu",
            "ImageNet ViT-Ti/16 at 224x224 on all of CIFAR-10, 10 epochs, 3 seeds: the paper's protocol at ViT-Ti size",
            TI_TRAIN.replace(img_size=224, epochs=10, batch_size=128, warmup_epochs=0.5),
            TI_METHODS,
            COMPARISON,
            (0, 1, 2),
            weights_env=WEIGHTS_ENV,
        ),
        Preset(
            "paper",
            "timm ViT-B/16 with ImageNet weights, CIFAR-10 at 224x224, 16x16 pixel shuffling, MeLo rank 4 (a GPU)",
            TrainConfig.from_flat(
                model="vit_base_patch16_224", epochs=5, batch_size=64, warmup_epochs=0.5, val_fraction=0.1
            ),
            {
                "full": MethodSettings(lr=1e-4),
                "linear": MethodSettings(lr=1e-3),
                "melo": MethodSettings(lr=1e-3),
                "lora-pe": MethodSettings(lr=1e-3),
            },
            COMPARISON,
            (0,),
            paper={"full": 96.16, "melo": 90.05, "lora-pe": 96.35},
        ),
        Preset(
            "small-cpu",
            "self-pretrained stand-in (history): 6-block ViT-Tiny, 4x4 patches on 32x32, upstream on half of CIFAR-10",
            SMALL_TRAIN.replace(epochs=3, train_subset=6_000),
            SMALL_METHODS,
            COMPARISON,
            (0, 1, 2),
            upstream=Upstream(epochs=6),  # sized for 60 minutes on 2 cores without fast bf16
        ),
        Preset(
            "small-demo",
            "a reduced small-cpu table (one seed, fewer images and epochs; history: the first demo)",
            SMALL_TRAIN.replace(epochs=2, train_subset=4_000, test_subset=5_000),
            SMALL_METHODS,
            COMPARISON,
            (0,),
            upstream=Upstream(epochs=2),
        ),
    )
}


def pretrain(
    model: str, upstream: Upstream, data: str | os.PathLike | None, quiet: bool = True
) -> tuple[Path, RunResult]:
    """Train ``model`` on plain images of part 0/2 and cache it, keyed by its configuration.

    Returns the weights file (a plain timm state dict) and the upstream run's result
    (its test accuracy is the quality that decides whether a comparison means anything).
    """
    source = cifar10_path(data)
    ident = json.dumps([model, asdict(upstream), str(source.resolve()) if source else "cifar10"], sort_keys=True)
    run = cache_dir() / "pretrained" / f"{model}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    weights = run / "weights.safetensors"
    if not (weights.exists() and (run / RESULT_FILE).exists()):
        cfg = TrainConfig.from_flat(
            out=str(run),
            data=str(source) if source else "cifar10",
            model=model,
            method="full",
            scheme="none",
            epochs=upstream.epochs,
            batch_size=upstream.batch_size,
            lr=upstream.lr,
            part="0/2",
            train_subset=upstream.train_subset,
            augment="crop-flip",
            warmup_epochs=1.0,
            quiet=quiet,
        )
        train(cfg, resume=(run / "config.yaml").exists())
        merge_to_file(run / "adapter", weights, None)
    return weights, RunResult.read(run / RESULT_FILE)


def cell_config(
    preset: Preset, method: str, scheme: str, seed: int, out: Path, key: Path, **common: object
) -> TrainConfig:
    """The TrainConfig of one cell: the preset's base, the method's settings, then ``common``."""
    cfg = preset.methods[method].apply(preset.base.replace(method=method))
    cfg = cfg.replace(**common) if common else cfg
    return cfg.replace(out=str(out), scheme=scheme, seed=seed, quiet=True, key=str(key) if scheme != "none" else None)


def _cell_worker(cfg: TrainConfig, log_file: str) -> RunResult:
    """In the spawned process: stderr (warnings, tracebacks of native crashes) goes to the cell's log."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return train(cfg, resume=True)


def run_cell(cfg: TrainConfig) -> RunResult:
    """Train one cell in a fresh spawned process; a finished cell is read back, not retrained.

    Errors keep their type and message (a child killed by a signal raises BrokenProcessPool).
    """
    out = Path(cfg.run.out)
    if (out / RESULT_FILE).exists():
        return RunResult.read(out / RESULT_FILE)
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_cell_worker, cfg, str(out / "stderr.log")).result()


def resolve_weights(
    preset: Preset, weights: str | os.PathLike | None, pretrained: bool | None
) -> tuple[str | None, bool]:
    """(weights file, download) for an ImageNet preset: --weights, else --pretrained, else $ENV, else an error."""
    if weights is None and not pretrained and preset.weights_env:
        weights = os.environ.get(preset.weights_env)
        if not weights:
            raise ValueError(
                f"preset {preset.name} needs ImageNet weights for {preset.model}: set {preset.weights_env} or pass "
                "--weights FILE (a timm state dict), or --pretrained to download timm's where there is a network"
            )
    if weights is not None:
        check_weights_file(weights)
        return str(weights), False
    return None, pretrained if pretrained is not None else True


def reproduce(
    preset: Preset,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool | None = None,
    overrides: dict | None = None,
    progress: bool = True,
) -> ResultTable:
    """Run every cell of ``preset`` (finished cells are skipped), then tabulate and plot."""
    out = Path(out)
    source = cifar10_path(data)
    common: dict = {"data": str(source) if source else "cifar10", **(overrides or {})}
    upstream_acc = None
    if preset.upstream is not None and weights is None:
        log.info("pretraining %s upstream (cached after the first run)", preset.model)
        weights, upstream = pretrain(preset.model, preset.upstream, data, quiet=not progress)
        upstream_acc = upstream.test_acc
    elif preset.upstream is None:
        weights, pretrained = resolve_weights(preset, weights, pretrained)
    common.update(weights=str(weights) if weights else None, pretrained=bool(pretrained) and weights is None)
    out.mkdir(parents=True, exist_ok=True)
    key_path = Path(key) if key else out / "reproduce.key"
    if not key_path.exists():
        Key.generate().save(key_path)
    cells = []
    for seed in preset.seeds:  # seed by seed: an interrupted run leaves whole tables of the first seeds
        for method in preset.methods:
            for scheme in preset.schemes:
                cell = Cell(method, scheme, seed)
                cfg = cell_config(
                    preset, method, scheme, seed, out / "cells" / f"{method}-{scheme}-s{seed}", key_path, **common
                )
                t0 = time.perf_counter()
                try:
                    cell.result = run_cell(cfg)
                except Exception as exc:  # one failed cell is reported in the table; the others still run
                    cell.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                status = cell.error or f"test acc {cell.result.test_acc:.4f}"
                log.info("%s %s seed %d: %s (%.0f s)", method, scheme, seed, status, time.perf_counter() - t0)
                cells.append(cell)
    table = ResultTable.from_cells(
        preset.name, preset.model, cells, upstream_acc, dict(preset.paper), preset.base.backbone.img_size
    )
    table.write(out)
    return table
