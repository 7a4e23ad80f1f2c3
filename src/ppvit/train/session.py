"""A training run's state and its construction: :func:`setup` builds the :class:`Session` the loop's
stages share (:mod:`ppvit.train.loop`).

``setup`` checks and locks the run folder, loads the data at the model's input side, builds the
model, optimiser and cipher, resumes from the checkpoint when asked and plans the learning-rate
:class:`Schedule`; the loop only runs it. ``benchmarks/bench_gpu.py`` builds its pipeline
through the same ``setup``.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.layers import DropPath

from ppvit._io import atomic_write_text
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import DataSplits, load_splits
from ppvit.data.encrypt import check_apart
from ppvit.data.pipeline import BatchPipeline
from ppvit.data.sources import Columns
from ppvit.models.backbones import create_backbone, input_size, normalization, patch_size
from ppvit.train.build import build_model, make_cipher, param_groups, run_fingerprint
from ppvit.train.config import TrainConfig
from ppvit.train.fast import make_optimizer, maybe_compile, resident_splits
from ppvit.train.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RunState,
    check_run_folder,
    load_checkpoint,
    lock_run_folder,
    plan_schedules,
)
from ppvit.train.runtime import make_accelerator, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Steps per epoch and the learning-rate schedule in optimiser steps."""

    steps_per_epoch: int  # micro-batches
    total: int  # optimiser steps
    warmup: int
    base_lrs: list[float]
    start: int = 0  # the micro-batch it starts at (> 0 once a resume with more epochs extended the run)


@dataclass
class Session:
    """A run in progress: everything the stages share."""

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    precision: str
    splits: DataSplits
    cipher: BlockCipher | None
    pipeline: BatchPipeline
    block: int
    data_seed: int
    model: torch.nn.Module  # as prepared by Accelerate (wrapped when distributed)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    state: RunState
    stop_signal: int | None = None  # set by SIGTERM/SIGINT: checkpoint and stop at the next step
    lock: Any = None  # the run folder's lock (main process), held while this object lives
    net: torch.nn.Module | None = None  # what runs forward: ``model``, or ``torch.compile(model)`` (train.fast)
    random_forward: bool = False  # the model draws at random in training (dropout): torch's RNG is seeded per step

    @property
    def forward(self) -> torch.nn.Module:
        return self.net if self.net is not None else self.model

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: TrainConfig, resume: bool, hold: ExitStack | None = None) -> Session:
    """Check the run folder, load and check the data, build model and optimiser, resume if asked.

    The main process locks the run folder first (a second run into it is refused); the lock
    is released when ``hold`` closes (without one: with the session).
    """
    out = Path(cfg.run.out)
    # read before this run rewrites it: a checkpoint older than RunState.schedules follows the run's own length
    saved_epochs = TrainConfig.load(out / CONFIG_FILE).optim.epochs if resume and (out / CONFIG_FILE).exists() else None
    precision = resolve_precision(cfg.optim.precision)
    report = None if cfg.run.report_to == "none" else cfg.run.report_to
    accelerator = make_accelerator(
        precision, cfg.optim.grad_accum, cfg.run.dist_timeout_s, report, str(out / "trackers") if report else None
    )
    lock = None
    if accelerator.is_main_process:
        log.info(cfg.describe_start())
        if cfg.data.data is not None:  # before the folder and its lock: nothing written into the data
            check_apart(cfg.data.data, out, "run folder", "the data", holding=True)
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_run_folder(out)
        if hold is not None:
            hold.callback(lock.close)
        check_run_folder(out, cfg, resume)
    world = accelerator.num_processes
    if cfg.optim.batch_size % world:
        raise ValueError(f"batch size {cfg.optim.batch_size} does not divide into {world} equal per-process shares")

    with torch.device("meta"):  # geometry first (no memory, no initialisation): a bad size fails before the data load
        probe = create_backbone(cfg.backbone.model, num_classes=0, img_size=cfg.backbone.img_size)
    block, side = cfg.crypto.block_size or patch_size(probe), input_size(probe)
    d = cfg.data
    data_seed = cfg.run.seed if d.data_seed is None else d.data_seed
    splits = load_run_data(cfg, data_seed, side, accelerator)
    if splits.manifest is not None:  # the server's case: ciphertext on disk, checked against this run
        fingerprint = Key.load(cfg.crypto.key).fingerprint if cfg.crypto.key else None
        splits.manifest.check(scheme=cfg.crypto.scheme, block_size=block, size=side, fingerprint=fingerprint)
        cipher = None
    else:
        cipher = make_cipher(cfg, block)
    model = build_model(cfg, len(splits.train.classes), cipher)
    mean, std = normalization(model)
    pipeline = BatchPipeline(input_size(model), mean, std, cipher, splits.encrypted, d.augment)
    if splits.manifest is not None and splits.manifest.preprocess is not None:  # how the client resized
        splits.manifest.preprocess.check(pipeline.recipe, f"encrypted dataset {d.data}")

    optimizer = make_optimizer(param_groups(model, cfg), accelerator.device)  # fused on CUDA
    model, optimizer = accelerator.prepare(model, optimizer)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a checkpoint's state replaces them
    trained_on = {"key_fingerprint": run_fingerprint(cipher, splits.manifest), "classes": list(splits.train.classes)}
    state = run_state(cfg, out, accelerator.unwrap_model(model), optimizer, resume, saved_epochs, trained_on)
    schedule = make_schedule(cfg, len(splits.train), base_lrs, state)
    if accelerator.is_main_process:  # written once the run's inputs have been checked: it marks the folder
        atomic_write_text(out / CONFIG_FILE, cfg.dump())
    if report:
        start_trackers(accelerator, cfg, hold)
    session = Session(
        cfg, out, accelerator, precision, splits, cipher, pipeline, block, data_seed, model, optimizer, schedule, state
    )
    session.lock = lock
    session.random_forward = draws_at_random(accelerator.unwrap_model(model))
    session.net = maybe_compile(model, accelerator.device, cfg.backbone.compile)
    return session


def draws_at_random(model: torch.nn.Module) -> bool:
    """Whether a training forward of ``model`` draws from torch's RNG: a dropout (LoRA's, timm's) or a
    stochastic depth that is not zero."""
    return any(
        (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
        or (isinstance(m, DropPath) and m.drop_prob > 0)
        for m in model.modules()
    )


def load_run_data(cfg: TrainConfig, data_seed: int, side: int, accelerator: Accelerator) -> DataSplits:
    """The run's train/validation/test splits at the model's input side; on a GPU resident there as uint8."""
    d = cfg.data
    columns = Columns(d.image_column, d.label_column)
    splits = load_splits(
        d.data,
        d.val_fraction,
        data_seed,
        d.part,
        d.train_subset,
        d.test_subset,
        columns,
        d.loader_workers,
        side,
        d.splits,
        d.strict,
    )
    if len(splits.val) == 0 and accelerator.is_main_process:
        log.info(
            "no validation images (--val-fraction %g of %d training images rounds to none a class): "
            "no epoch is chosen, the last epoch is the one kept and tested",
            d.val_fraction,
            len(splits.train),
        )
    return resident_splits(splits, accelerator.device, d.device_data)  # GPU: uint8 on the device (train.fast)


def run_state(
    cfg: TrainConfig,
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    resume: bool,
    saved_epochs: int | None,
    trained_on: dict[str, Any],
) -> RunState:
    """Where the run starts: the interrupted run's checkpoint when resuming (a fresh state without one),
    with its schedules planned for ``cfg``'s epochs (``--resume --epochs N`` extends the run under a new
    warm-up and cosine). ``trained_on``: the key fingerprint and classes, which a checkpoint must share."""
    state = RunState(trained_on=trained_on)
    if resume and (out / CHECKPOINT_FILE).exists():
        state = load_checkpoint(out / CHECKPOINT_FILE, model, optimizer, trained_on)
        log.info("resumed %s at epoch %d, step %d", out, state.epoch, state.step)
    if plan_schedules(state, cfg.optim.epochs, saved_epochs, out):
        log.info(
            "extending %s to %d epochs: a new warm-up and cosine schedule from epoch %d's last weights",
            out,
            cfg.optim.epochs,
            state.epoch,
        )
    return state


def start_trackers(accelerator: Accelerator, cfg: TrainConfig, hold: ExitStack | None) -> None:
    """Accelerate's tracker for ``--report-to`` (main process only), under ``OUT/trackers``; its run is
    ended (files flushed) when ``hold`` closes, however the run ends."""
    if cfg.run.report_to == "wandb":
        os.environ.setdefault("WANDB_DIR", str(Path(cfg.run.out) / "trackers"))
    hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in cfg.flat().items()}
    try:
        accelerator.init_trackers(Path(cfg.run.out).resolve().name or "ppvit", config=hparams)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"--report-to {cfg.run.report_to}: cannot start it ({exc})") from None
    if hold is not None:
        hold.callback(accelerator.end_training)


def make_schedule(cfg: TrainConfig, n_train: int, base_lrs: list[float], state: RunState | None = None) -> Schedule:
    """The schedule in force: from the start of the run, or from where the last extension began it."""
    o = cfg.optim
    steps_per_epoch = n_train // o.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {o.batch_size} is larger than the training set ({n_train} images)")
    warmup = max(1, round(o.warmup_epochs * steps_per_epoch / o.grad_accum))
    start = state.schedules[-1]["start_step"] if state is not None and state.schedules else 0
    return Schedule(steps_per_epoch, (steps_per_epoch * o.epochs - start) // o.grad_accum, warmup, base_lrs, start)
