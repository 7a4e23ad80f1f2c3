"""Running a preset: checks first, the key, an upstream model where the preset pretrains one, an estimate and
budget (:mod:`~ppvit.experiments.budget`), every cell (:mod:`~ppvit.experiments.cells`; finished ones skipped,
so a rerun continues), then the result table."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

from ppvit._io import first_missing, remove_empty_folders
from ppvit.crypto.keys import Key
from ppvit.data.cache import cache_dir
from ppvit.data.datasets import load_test_split, resolve_data
from ppvit.data.sources.cifar10 import CIFAR10_ENV
from ppvit.data.sources.cifar10 import NAME as CIFAR10_NAME
from ppvit.experiments.budget import BUDGET_FILE, estimate, fit_budget
from ppvit.experiments.cells import cell_config, check_finished, rerun_continues, run_cells
from ppvit.experiments.presets import Preset, Upstream
from ppvit.experiments.results import Cell, ResultTable
from ppvit.models.adapters import merge_to_file
from ppvit.models.weights import check_weights_file
from ppvit.train.config import TrainConfig
from ppvit.train.loop import TrainingStopped, train
from ppvit.train.runs import (
    CONFIG_FILE,
    LOCK_FILE,
    RESULT_FILE,
    RunFolderBusy,
    RunResult,
    lock_run_folder,
    remove_empty_run_folder,
)

log = logging.getLogger(__name__)


def pretrain(
    model: str, upstream: Upstream, data: str | os.PathLike | None, quiet: bool = True
) -> tuple[Path, RunResult]:
    """Train ``model`` on plain images of part 0/2 and cache it, keyed by its configuration.

    Returns the weights file (a plain timm state dict) and the upstream run's result
    (its test accuracy is the quality that decides whether a comparison means anything).
    """
    source = resolve_data(data)
    ident = json.dumps([model, asdict(upstream), str(source.resolve()) if source else "cifar10"], sort_keys=True)
    run = cache_dir() / "pretrained" / f"{model}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    weights = run / "weights.safetensors"
    if weights.exists():
        try:
            check_weights_file(weights)
        except ValueError:  # a cache cut short (a full disk, a copy): merged again from the run beside it
            log.warning("cached upstream model %s cannot be read; merging it again from %s", weights, run / "adapter")
            weights.unlink()
    if not (run / RESULT_FILE).exists():
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
        weights.unlink(missing_ok=True)  # merged from this run, not one left beside an unfinished one
    if not weights.exists():
        merge_to_file(run / "adapter", weights, None)
    return weights, RunResult.read(run / RESULT_FILE)


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
    minutes: float | None = None,
    one_process: bool = False,
) -> ResultTable:
    """Run every cell of ``preset`` (finished cells are skipped), then tabulate and plot.

    Fails fast, before any training, on data it cannot use; and when the first cell fails (every
    cell shares its data, weights and key) nothing else runs and no table is written. ``one_process``
    trains every cell in this process: no process start, imports and CUDA context per cell (seconds
    each, a large share of a short GPU cell), but a crash ends the whole run. With a time
    budget (``minutes``, else the preset's; 0 for none) a machine too slow for it trains every cell
    on fewer images, chosen before the first cell from measured speeds and stated in the table.
    A failure removes what this call made and nothing needs: the key it generated (unless a cell
    started training with it) and folders left empty; never a key or folder that was there before.
    ``out`` is locked while it runs: a second reproduce into it is refused.
    """
    out = Path(out)
    check_request(preset, out, key, overrides, minutes)
    created = first_missing(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_run_folder(out, "output folder", "reproduce")
    except (RunFolderBusy, OSError):
        if created is not None:  # never another run's lock file
            remove_empty_run_folder(out, created)
        raise
    key_path = Path(key) if key else out / KEY_FILE
    made_key = not key_path.exists()
    try:
        if made_key:
            Key.generate().save(key_path)
        return _reproduce(preset, out, data, key_path, weights, pretrained, overrides, progress, minutes, one_process)
    except BaseException:
        if made_key and not any(out.glob(f"cells/*/{CONFIG_FILE}")):  # no cell has trained with it
            key_path.unlink(missing_ok=True)
        lock.close()  # before its file goes (Windows cannot remove an open file)
        if created is not None:
            (out / LOCK_FILE).unlink(missing_ok=True)
        remove_empty_folders(out, created)
        raise
    finally:
        lock.close()


def check_request(
    preset: Preset, out: Path, key: str | os.PathLike | None, overrides: dict | None, minutes: float | None
) -> None:
    """What can be checked before anything is read or made, refused in one line: a key named that is not there (a
    typo made a new key, and every cell trained with it) or cannot be read, a time budget that is not a number, and
    every scheme with this run's settings and key pin (a bogus one failed only in its own cells, after the others)."""
    if key is not None:
        if not Path(key).is_file():
            raise FileNotFoundError(f"key file {key}: not found (without --key, reproduce makes one in {out})")
        Key.load(key)
    if minutes is not None and not (math.isfinite(minutes) and minutes >= 0):
        raise ValueError(f"--minutes {minutes:g}: must be 0 (no budget) or a finite number of minutes above it")
    method, seed, key_path = next(iter(preset.methods)), preset.seeds[0], Path(key) if key else out / KEY_FILE
    for scheme in preset.schemes:
        cell_config(preset, method, scheme, seed, out, key_path, **(overrides or {})).settled_geometry()


def _reproduce(
    preset: Preset,
    out: Path,
    data: str | os.PathLike | None,
    key_path: Path,
    weights: str | os.PathLike | None,
    pretrained: bool | None,
    overrides: dict | None,
    progress: bool,
    minutes: float | None,
    one_process: bool,
) -> ResultTable:
    if preset.upstream is None:  # the weights first: a missing file is named before any data is read
        weights, pretrained = resolve_weights(preset, weights, pretrained)
    source = check_data(data, preset.base.backbone.img_size)
    common: dict = {"data": str(source) if source else CIFAR10_NAME, **(overrides or {})}
    upstream_acc = None
    if preset.upstream is not None and weights is None:
        log.info("pretraining %s upstream (cached after the first run)", preset.model)
        try:
            weights, upstream = pretrain(preset.model, preset.upstream, data, quiet=not progress)
        except TrainingStopped as exc:
            raise rerun_continues(exc, "while pretraining the upstream model, its checkpoint kept") from None
        upstream_acc = upstream.test_acc
    common.update(weights=str(weights) if weights else None, pretrained=bool(pretrained) and weights is None)
    # seed by seed: an interrupted run leaves whole tables of the first seeds
    todo = [Cell(m, s, seed) for seed in preset.seeds for m in preset.methods for s in preset.schemes]

    def configs_with(common: dict) -> list[TrainConfig]:
        named = [(c, out / "cells" / f"{c.method}-{c.scheme}-s{c.seed}") for c in todo]
        return [cell_config(preset, c.method, c.scheme, c.seed, folder, key_path, **common) for c, folder in named]

    configs = configs_with(common)
    left = [cfg for cfg in configs if not (Path(cfg.run.out) / RESULT_FILE).exists()]
    minutes = preset.minutes if minutes is None else minutes
    # a size a budget chose for this folder stands on every rerun, --minutes 0 included (no mixed sizes)
    budgeted = "train_subset" not in (overrides or {}) and (bool(minutes) or (out / BUDGET_FILE).exists())
    est = estimate(left, spawn=not one_process) if left and (progress or budgeted) else None
    budget = fit_budget(out, configs, left, minutes, est) if budgeted else None
    if budget is not None:
        common["train_subset"] = budget["train_subset"]
        configs = configs_with(common)
        est = est and replace(est, seconds=est.fixed + est.per_image * budget["train_subset"])
    if est and progress:
        log.info(est.line())
    check_finished(configs)
    run_cells(todo, configs, preset.name, progress, spawn=not one_process)
    table = ResultTable.from_cells(  # parameters counted at the cells' input size (the position embedding)
        preset.name, preset.model, todo, upstream_acc, dict(preset.paper), configs[0].backbone.img_size
    )
    table.settings = {
        "data": common["data"],
        "key_fingerprint": Key.load(key_path).fingerprint,
        "weights": common.get("weights"),
        "overrides": dict(overrides or {}),
        **({"budget": budget} if budget else {}),
    }
    table.write(out)
    return table


KEY_FILE = "reproduce.key"  # in the output folder: the key a run without --key generates


def check_data(data: str | os.PathLike | None, size: int | None = None) -> Path | None:
    """The dataset a comparison trains on, refused in one line before any cell when it cannot be used.

    Plain images only (each cell encrypts them with its scheme); ``cifar10`` downloads once, here.
    Reading the test split once also warms the cache every cell then reads (photos of several sizes
    resized to ``size``, the preset's input size).
    """
    chosen = data or os.environ.get(CIFAR10_ENV)
    if not chosen:
        raise ValueError(
            "no data: pass --data (the CIFAR-10 copy, or your own images: a folder or tar with train/ and test/, "
            f"a Hugging Face dataset, WebDataset shards), set {CIFAR10_ENV}, or --data {CIFAR10_NAME} to download"
        )
    _, manifest = load_test_split(chosen, size=size)
    if manifest is not None:
        raise ValueError(
            f"dataset {chosen}: encrypted (`ppvit encrypt` output); reproduce needs the plain images, which each "
            "cell encrypts with its own scheme"
        )
    return resolve_data(chosen)
