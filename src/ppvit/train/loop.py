"""Fine-tuning on encrypted (or plain) images: a short driver over named stages.

    train(cfg)  =  setup  ->  for each epoch: train_epoch, end_epoch  ->  finish

``setup`` (:mod:`ppvit.train.session`) builds everything a run needs (accelerator, data, model,
optimiser, schedule, resumed state) into a :class:`~ppvit.train.session.Session`;
``train_epoch`` is the step loop; ``end_epoch`` validates, keeps the best epoch and checkpoints;
``finish`` reloads the best epoch, touches the test set once, writes the adapter and returns the
:class:`~ppvit.train.runs.RunResult`.

Accelerate places the model, runs bf16 autocast on the CPU (AMP on a GPU), accumulates
gradients and wraps the model for multi-process data-parallel training (``accelerate
launch`` or ``torchrun``; gloo on CPUs). Batches are drawn by hand from an in-memory uint8
array (:func:`~ppvit.data.datasets.get_batch`), or streamed from WebDataset shards
(:class:`~ppvit.data.streaming.ShardStream`, see there for its order): the order of epoch
``e`` is a permutation seeded by ``(data_seed, e)`` and each global batch is split into equal contiguous shards, one per
process, so one process with batch B and two with B/2 each see the same images, and a
resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ppvit._io import first_missing
from ppvit.crypto.ciphers import Scheme
from ppvit.data.augment import mix_batch
from ppvit.data.pipeline import DeviceDataset, epoch_order, get_batch
from ppvit.data.streaming import ShardStream
from ppvit.models.adapters import load_adapter, save_adapter
from ppvit.train.build import adapter_meta
from ppvit.train.config import TrainConfig
from ppvit.train.fast import StepTotals, log_every
from ppvit.train.inference import evaluate, score_test
from ppvit.train.runs import (
    CHECKPOINT_FILE,
    RESULT_FILE,
    RunResult,
    RunState,
    load_best,
    remove_empty_run_folder,
    save_best,
    save_checkpoint,
    write_metrics,
)
from ppvit.train.runtime import peak_rss_mb, peer_failure
from ppvit.train.session import Session, setup

log = logging.getLogger(__name__)

StepCallback = Callable[[int, torch.nn.Module], None]


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


class PeerProcessFailed(ConnectionError):
    """Another process of a multi-process run died or stopped answering; ``--resume`` continues
    from the last checkpoint. A ``ConnectionError``: the CLI reports it in one line, exit 1."""


class TrainingStopped(RuntimeError):
    """A SIGTERM or SIGINT stopped the run after saving a checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> tuple:  # pickled back from a cell's spawned process with its signal
        return type(self), (str(self), self.signum)


# -- the learning-rate schedule ------------------------------------------------------------------


def get_lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- the stages ----------------------------------------------------------------------------------


def epoch_feed(s: Session, epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of the batches ``first ..`` of epoch ``epoch``.

    In memory: the epoch's permutation (:func:`epoch_order`) cut into global batches. Streamed:
    the shards' order seeded by ``(data_seed, epoch)`` (:meth:`ShardStream.batches`).
    """
    ds, b, steps = s.splits.train, s.cfg.optim.batch_size, s.schedule.steps_per_epoch
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    if isinstance(ds, ShardStream):
        seed = s.data_seed * 100_003 + epoch
        yield from ds.batches(b // world, rank, world, shuffle=True, seed=seed, skip=first, steps=steps - first)
        return
    order = epoch_order(len(ds), s.data_seed, epoch)
    if isinstance(ds, DeviceDataset):  # one copy of the epoch's order, not one per batch
        order = order.to(ds.images.device)
    for i in range(first, steps):
        yield get_batch(ds, order[i * b : (i + 1) * b], rank, world)


def train_epoch(s: Session, epoch: int, on_step: StepCallback | None) -> dict[str, float]:
    """One epoch of optimiser steps (from the resumed step, if any); returns this process's sums."""
    cfg, acc, sched = s.cfg, s.accelerator, s.schedule
    o, rank, world = cfg.optim, acc.process_index, acc.num_processes
    s.model.train()
    first = s.state.step - epoch * sched.steps_per_epoch  # > 0 only when resuming mid-epoch
    feed = epoch_feed(s, epoch, first)
    totals = StepTotals(acc.device, s.state.partial)  # on the device: read every `every_sync` steps (train.fast)
    every_sync = log_every(acc.device, cfg.run.log_every_steps)
    s.state.partial = None
    bar = tqdm(
        range(first, sched.steps_per_epoch), desc=f"epoch {epoch + 1}/{o.epochs}", disable=cfg.run.quiet or not s.main
    )
    t0 = time.perf_counter()

    def synced(i: int, loss: torch.Tensor) -> dict[str, float]:
        """The sums so far on the host; a loss that was not finite stops the run here."""
        sums, finite = totals.read()
        if not finite:
            ckpt = s.out / CHECKPOINT_FILE
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; stopped. Last good checkpoint: "
                f"{ckpt if ckpt.exists() else 'none'}. Try a lower --lr or --patch-embed-lr-scale."
            )
        rate = sums["n"] * world / max(1e-9, time.perf_counter() - t0)
        bar.set_postfix(
            loss=f"{sums['loss'] / sums['n']:.3f}", acc=f"{sums['correct'] / sums['n']:.3f}", ips=f"{rate:.0f}"
        )
        return sums

    for i in bar:
        step = epoch * sched.steps_per_epoch + i
        if s.stop_signal is not None and step % o.grad_accum == 0:  # between optimiser steps
            partial = totals.read()[0]
            _stop(s, RunState(**{**vars(s.state), "epoch": epoch, "step": step, "partial": partial}))
        gen = torch.Generator().manual_seed(s.data_seed * 1_000_003 + step * 97 + rank)
        if s.random_forward:  # dropout draws from torch's own RNG: the same masks in a resumed run as in one run
            torch.manual_seed(int(np.random.SeedSequence((cfg.run.seed, step, rank)).generate_state(1)[0]))
        images, labels = next(feed)
        images, labels = images.to(acc.device), labels.to(acc.device)
        x = s.pipeline(images, train=True, generator=gen)
        x, target = mix_batch(x, labels, len(s.splits.train.classes), cfg.data.mixup, cfg.data.cutmix, s.block, gen)
        with acc.accumulate(s.model):
            for g, lr in zip(s.optimizer.param_groups, sched.base_lrs, strict=True):
                g["lr"] = lr * get_lr_scale((step - sched.start) // o.grad_accum, sched.total, sched.warmup)
            with acc.autocast():
                logits = s.forward(x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=o.label_smoothing)
            totals.add(loss, logits, labels)
            if (i + 1 - first) % every_sync == 0:
                synced(i, loss)
            acc.backward(loss)
            if o.clip_grad and acc.sync_gradients:
                acc.clip_grad_norm_(s.model.parameters(), o.clip_grad)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            if on_step is not None and s.main and acc.sync_gradients:
                on_step((step + 1) // o.grad_accum, s.unwrapped)
        every = cfg.run.save_every_steps
        if every and (step + 1) % every == 0 and i + 1 < sched.steps_per_epoch and s.main:
            partial = RunState(**{**vars(s.state), "epoch": epoch, "step": step + 1, "partial": synced(i, loss)})
            save_checkpoint(s.out / CHECKPOINT_FILE, s.unwrapped, s.optimizer, partial)
    sums = synced(sched.steps_per_epoch - 1, loss) if sched.steps_per_epoch > first else totals.read()[0]
    sums["seconds"] = time.perf_counter() - t0
    return sums


def end_epoch(s: Session, epoch: int, sums: dict[str, float]) -> None:
    """Validate, record the epoch, keep the best weights, checkpoint, write metrics."""
    acc = s.accelerator
    val = evaluate(s.forward, s.splits.val, s.pipeline, s.cfg.optim.batch_size, acc)
    if val["n"] == 0:  # no validation split: each epoch replaces the last as the one kept (said in setup)
        val.update(loss=None, acc=None)
    train_stats = acc.reduce(
        torch.tensor([sums["loss"], sums["correct"], sums["n"]], dtype=torch.float64, device=acc.device),
        reduction="sum",
    )
    row = {
        "epoch": epoch + 1,
        "train_loss": float(train_stats[0] / train_stats[2]),
        "train_acc": float(train_stats[1] / train_stats[2]),
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "lr": s.optimizer.param_groups[0]["lr"],
        "images_per_s": float(train_stats[2]) / sums["seconds"],
        "seconds": sums["seconds"],
    }
    s.state.history.append(row)
    s.state.epoch, s.state.step = epoch + 1, (epoch + 1) * s.schedule.steps_per_epoch
    if s.main:
        if val["acc"] is None or val["acc"] > s.state.best_val_acc:
            s.state.best_epoch = epoch + 1
            s.state.best_val_acc = s.state.best_val_acc if val["acc"] is None else val["acc"]
            save_best(s.out, s.unwrapped)
        save_checkpoint(s.out / CHECKPOINT_FILE, s.unwrapped, s.optimizer, s.state)
        write_metrics(s.out, s.state.history)
    if s.cfg.run.report_to != "none":
        acc.log({k: v for k, v in row.items() if k != "epoch" and v is not None}, step=epoch + 1)
    if s.main:  # every run, tracker or not
        val_text = "no validation" if val["n"] == 0 else f"val loss {val['loss']:.4f} acc {val['acc']:.4f}"
        log.info(
            "epoch %d: train loss %.4f acc %.4f | %s | %.0f img/s",
            *(row[k] for k in ("epoch", "train_loss", "train_acc")),
            val_text,
            row["images_per_s"],
        )
    acc.wait_for_everyone()


def finish(s: Session) -> RunResult:
    """Reload the best epoch, write the adapter, touch the test set once (the adapter as saved), write the result."""
    cfg, history = s.cfg, s.state.history
    load_best(s.out, s.unwrapped)
    meta = adapter_meta(cfg, s.splits.train.classes, s.cipher, s.splits.manifest, s.pipeline.recipe)
    if s.main:
        save_adapter(s.unwrapped, meta, s.out / "adapter")
    s.accelerator.wait_for_everyone()
    # measured on the adapter as saved, as `ppvit eval` measures it: one run, one test accuracy
    model, meta = load_adapter(s.out / "adapter", cfg.backbone.weights)
    key = s.cipher.key if s.cipher is not None else None
    test = score_test(model, meta, s.splits.test, s.splits.encrypted, key, s.accelerator)
    result = RunResult(
        test_acc=test["acc"],
        test_loss=test["loss"],
        test_images=test["n"],
        best_epoch=s.state.best_epoch,
        best_val_acc=s.state.best_val_acc if s.state.best_val_acc >= 0 else None,  # None: no validation split
        epochs=cfg.optim.epochs,
        method=cfg.method.name,
        scheme=str(Scheme.parse(cfg.crypto.scheme)) if cfg.crypto.encrypted else "plain",
        num_classes=len(s.splits.train.classes),
        trainable_params=sum(p.numel() for p in s.unwrapped.parameters() if p.requires_grad),
        train_seconds=sum(r["seconds"] for r in history),
        images_per_s=float(np.mean([r["images_per_s"] for r in history])) if history else None,
        peak_rss_mb=peak_rss_mb(),
        processes=s.accelerator.num_processes,
        precision=s.precision,
        unreadable=dict(s.splits.unreadable),
        schedules=s.state.schedules,
    )
    if cfg.run.report_to != "none":
        s.accelerator.log({"test_loss": test["loss"], "test_acc": test["acc"]}, step=len(history))
    if s.main:
        result.write(s.out / RESULT_FILE)
    return result


def train(cfg: TrainConfig, resume: bool = False, on_step: StepCallback | None = None) -> RunResult:
    """Fine-tune, select the epoch with the best validation accuracy, report on the test set.

    ``on_step(step, model)`` is called on the main process after every optimiser step with the
    unwrapped model (e.g. to watch a tensor as training proceeds, as ``ppvit.attacks.audit`` does).
    The run folder is locked while it runs. In a single process, SIGTERM or SIGINT saves a
    checkpoint at the next step and raises :class:`TrainingStopped` (``resume=True`` continues).
    With several processes, one that dies or hangs makes the others raise :class:`PeerProcessFailed`
    within ``cfg.run.dist_timeout_s`` (at once when its connections close) instead of waiting for ever.
    """
    cfg = cfg.resolved()
    out = Path(cfg.run.out)
    created = first_missing(out)
    try:
        with ExitStack() as hold:
            try:
                session = setup(cfg, resume, hold)
            except BaseException:
                if created is not None:  # refused before anything was written: leave no empty folder behind
                    hold.close()
                    remove_empty_run_folder(out, created)
                raise
            hold.enter_context(_stop_on_signals(session))
            if session.random_forward:  # seeded per step: the caller's RNG streams are given back as they were
                hold.enter_context(torch.random.fork_rng(devices=range(torch.cuda.device_count())))  # as seeded
            for epoch in range(session.state.epoch, cfg.optim.epochs):
                sums = train_epoch(session, epoch, on_step)
                end_epoch(session, epoch, sums)
                if session.stop_signal is not None and epoch + 1 < cfg.optim.epochs:
                    _stop(session, None)  # end_epoch has just saved the checkpoint
            return finish(session)
    except RuntimeError as exc:  # gloo and NCCL raise plain RuntimeErrors; torch's DistError is one
        reason = peer_failure(exc)
        if reason is None:
            raise
        ckpt = Path(cfg.run.out) / CHECKPOINT_FILE
        last = f"the last checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was saved yet"
        raise PeerProcessFailed(
            f"another process of this run died or stopped answering ({reason}; --dist-timeout-s "
            f"{cfg.run.dist_timeout_s:g}), so this one stopped too; {last}: start every process again with "
            "the same command and --resume"
        ) from None


@contextmanager
def _stop_on_signals(s: Session) -> Iterator[None]:
    """SIGTERM or SIGINT: finish the current step, save a checkpoint, raise :class:`TrainingStopped`.

    A second signal stops at once (KeyboardInterrupt). One process only: ranks of a
    distributed run could stop at different steps, so there the signals keep their defaults.
    """
    if s.accelerator.num_processes > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if s.stop_signal is not None:
            raise KeyboardInterrupt
        s.stop_signal = signum

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _stop(s: Session, state: RunState | None) -> None:
    """Save ``state`` (None: the checkpoint on disk is current) and raise :class:`TrainingStopped`."""
    ckpt = s.out / CHECKPOINT_FILE
    if state is not None and s.main:
        save_checkpoint(ckpt, s.unwrapped, s.optimizer, state)
    state = state or s.state
    step = state.step - state.epoch * s.schedule.steps_per_epoch
    raise TrainingStopped(
        f"stopped by {signal.Signals(s.stop_signal).name} at epoch {state.epoch + 1}, step {step}; "
        f"checkpoint saved in {ckpt}: continue with the same command and --resume",
        s.stop_signal,
    )
