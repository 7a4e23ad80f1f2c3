"""Running a preset: every cell (finished ones skipped, so a rerun continues), then the result table.

Each cell trains in its own spawned process through :func:`ppvit.train.loop.train` (its peak
memory is its own, a crash stays its own); its exception comes back with type and message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ppvit._io import LockHeld, atomic_write_json, first_missing, hold_lock, remove_empty_folders
from ppvit.crypto.keys import Key
from ppvit.data.cache import cache_dir
from ppvit.data.datasets import load_splits, load_test_split, resolve_data
from ppvit.data.sources.cifar10 import CIFAR10_ENV
from ppvit.data.sources.cifar10 import NAME as CIFAR10_NAME
from ppvit.experiments.presets import Preset, Upstream
from ppvit.experiments.results import Cell, ResultTable, speeds_text
from ppvit.models.adapters import merge_to_file
from ppvit.models.weights import check_weights_file
from ppvit.train.config import TrainConfig
from ppvit.train.loop import TrainingStopped, train
from ppvit.train.runs import CONFIG_FILE, LOCK_FILE, RESULT_FILE, RunResult, changed_settings
from ppvit.train.runtime import resolve_precision

if TYPE_CHECKING:
    import torch

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


def cell_config(
    preset: Preset, method: str, scheme: str, seed: int, out: Path, key: Path, **common: object
) -> TrainConfig:
    """The TrainConfig of one cell: the preset's base, the method's settings, then ``common``."""
    cfg = preset.methods[method].apply(preset.base.replace(method=method))
    cfg = cfg.replace(**common) if common else cfg
    return cfg.replace(out=str(out), scheme=scheme, seed=seed, quiet=True, key=str(key) if scheme != "none" else None)


def _cell_worker(cfg: TrainConfig, log_file: str, parent: int) -> RunResult:
    """In the spawned process: stderr (warnings, tracebacks of native crashes) goes to the cell's log; the cell
    stops when ``parent`` (reproduce) dies."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    done = threading.Event()
    threading.Thread(target=_stop_with_parent, args=(parent, done), daemon=True).start()
    try:
        return train(cfg, resume=True)
    finally:
        done.set()


def _stop_with_parent(parent: int, done: threading.Event, poll_s: float = 1.0) -> None:
    """Once ``parent`` is gone (``kill -9`` of reproduce), stop this cell as a SIGTERM does (a checkpoint at the
    next step) and end the process: a cell orphaned trained on, then waited for work forever, holding its memory."""
    while os.getppid() == parent:
        if done.wait(poll_s):
            return
    os.kill(os.getpid(), signal.SIGTERM)
    done.wait()
    os._exit(1)


def run_cell(cfg: TrainConfig, spawn: bool = True) -> RunResult:
    """Train one cell in a fresh spawned process (``spawn=False``: in this one); a finished cell is read
    back, not retrained, and an interrupted one resumes from its checkpoint.

    Errors keep their type and message (a child killed by a signal raises BrokenProcessPool).
    """
    out = Path(cfg.run.out)
    if (out / RESULT_FILE).exists():
        return RunResult.read(out / RESULT_FILE)
    out.mkdir(parents=True, exist_ok=True)
    if not spawn:
        return train(cfg, resume=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(os.getpid).result()  # the pool's one process, which then trains the cell
        with _sigterm_forwarded_to(child):
            return pool.submit(_cell_worker, cfg, str(out / "stderr.log"), os.getpid()).result()


@contextmanager
def _sigterm_forwarded_to(pid: int) -> Iterator[None]:
    """A SIGTERM sent to this process alone (``kill PID``, a job runner) goes on to the cell's process,
    which checkpoints and comes back with :class:`TrainingStopped`; without it, this process died and
    the cell trained on, orphaned, holding its folder's lock. (Ctrl-C reaches the whole process group.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(pid, signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
        lock = hold_lock(out / LOCK_FILE)
    except LockHeld as held:  # two runs into one folder: one's failure deleted the key the other trained with
        remove_empty_folders(out, created)
        holder = f" (pid {held.holder})" if held.holder else ""
        raise ValueError(
            f"output folder {out}: in use by another `ppvit reproduce`{holder}; wait for it or choose another --out"
        ) from None
    key_path = Path(key) if key else out / KEY_FILE
    made_key = not key_path.exists()
    try:
        if made_key:
            Key.generate().save(key_path)
        return _reproduce(preset, out, data, key_path, weights, pretrained, overrides, progress, minutes, one_process)
    except BaseException:
        if made_key and not any(out.glob(f"cells/*/{CONFIG_FILE}")):  # no cell has trained with it
            key_path.unlink(missing_ok=True)
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
        weights, upstream = pretrain(preset.model, preset.upstream, data, quiet=not progress)
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


def check_finished(configs: list[TrainConfig]) -> None:
    """A finished cell is read back, not trained again: one trained with other settings than this run's (a rerun
    with --epochs, --set, another --key) would stand in the table under this run's settings. Refused, naming it."""
    for cfg in configs:
        run = Path(cfg.run.out)
        if (run / RESULT_FILE).exists() and (run / CONFIG_FILE).exists():
            changed = changed_settings(run, cfg.resolved())
            if changed:
                raise ValueError(
                    f"finished cell {run}: trained with other settings ({', '.join(changed)}) than this run's; "
                    "give another --out, or drop the flags that changed them"
                )


def run_cells(todo: list[Cell], configs: list[TrainConfig], name: str, progress: bool, spawn: bool = True) -> None:
    """Train each cell (its result or error set on it), one line each; the first cell's failure
    stops everything, since every cell shares its data, weights and key, and so does a stop signal
    (its cell keeps a checkpoint; a rerun resumes it)."""
    bar = tqdm(todo, desc=f"reproduce {name}", unit="cell", disable=not progress, dynamic_ncols=True)
    with logging_redirect_tqdm():
        for i, (cell, cfg) in enumerate(zip(bar, configs, strict=True)):
            bar.set_postfix_str(f"{cell.method} {cell.scheme} seed {cell.seed}")
            run = Path(cfg.run.out)
            t0 = time.perf_counter()
            try:
                cell.result = run_cell(cfg, spawn)
            except TrainingStopped as exc:  # SIGTERM/SIGINT asked the whole run to stop, not this cell alone
                raise TrainingStopped(  # its message said `--resume`, which reproduce has no need of
                    f"stopped by {signal.Signals(exc.signum).name} in the cell {cell.method} {cell.scheme} seed "
                    f"{cell.seed}, its checkpoint kept in {run}: the same reproduce command continues it",
                    exc.signum,
                ) from None
            except Exception as exc:  # one failed cell is reported in the table; the others still run
                if i == 0:
                    raise ValueError(
                        f"the first cell ({cell.method}, {cell.scheme}, seed {cell.seed}) failed, so every cell "
                        f"would: {type(exc).__name__}: {str(exc)[:300]} (its log: {run / 'stderr.log'})"
                    ) from None
                cell.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            status = cell.error or f"test acc {cell.result.test_acc:.4f}"
            log.info(
                "%s %s seed %d: %s (%.0f s)", cell.method, cell.scheme, cell.seed, status, time.perf_counter() - t0
            )


KEY_FILE = "reproduce.key"  # in the output folder: the key a run without --key generates
BUDGET_FILE = "budget.json"  # in the output folder: the training subset a budget chose (reruns keep it)
BUDGET_MARGIN = 0.8  # aim this far under the budget: estimates were 18-25% off (RESULTS.md, the demo on one core)
MIN_TRAIN_SUBSET = 500


@dataclass(frozen=True)
class Estimate:
    """Seconds the sized cells should take here, as ``fixed + per_image * train_subset``."""

    fixed: float  # process starts and testing: they do not grow with the training subset
    per_image: float  # per image of the training subset (training and validation, all cells)
    train_subset: int | None  # the cells' common training subset (None: they differ)
    seconds: float  # the cells as they are
    sized: int  # cells with a training subset (only those can be resized to a budget)
    cells: int
    speeds: dict[str, float]
    precision: str
    device: str = "cpu"

    def line(self) -> str:
        return (
            f"estimate: about {self.seconds / 60:.0f} min for {self.cells} cells on this machine "
            f"(training img/s measured just now on {self.device}: {speeds_text(self.speeds)}; precision "
            f"{self.precision})"
        )

    def fit(self, budget_s: float) -> int | None:
        """The training subset (rounded down to two digits, at least ``MIN_TRAIN_SUBSET``) that fits
        within ``BUDGET_MARGIN`` of ``budget_s``; None when the cells already fit or cannot be resized."""
        if self.train_subset is None or self.sized < self.cells or self.seconds <= BUDGET_MARGIN * budget_s:
            return None
        fitting = max(1, int((BUDGET_MARGIN * budget_s - self.fixed) / self.per_image))
        step = 10 ** max(0, len(str(fitting)) - 2)
        return min(self.train_subset, max(MIN_TRAIN_SUBSET, fitting // step * step))


def estimate(cells: list[TrainConfig], spawn: bool = True) -> Estimate:
    """How long ``cells`` should take on this machine, measured before they start.

    Each method's training speed is measured here on the device the cells train on, at their
    batch size and input size, in their precision, after warm-up steps (compiling, autotuning);
    evaluation is taken as forward passes at the measured speed of the fastest method, and
    what a cell costs beyond its images (process start, data, compiling, testing) by one real
    cell of a few images. A cell without a training subset trains on the whole training split,
    counted once the trial cell has cached it.
    """
    speeds = {cfg.method.name: training_speed(cfg) for cfg in {c.method.name: c for c in cells}.values()}
    forward = max(speeds.values())
    start = cell_overhead_seconds(cells[0], spawn)
    whole: dict[tuple, int] = {}  # training images of the cells without a subset, by data, part and size
    fixed = per_image = seconds = 0.0
    for cfg in cells:
        d, o = cfg.data, cfg.optim
        where = (d.data, d.part, cfg.backbone.img_size)
        if d.train_subset is None and where not in whole:
            whole[where] = training_images(cfg)
        test = (d.test_subset or 10_000) / forward
        slope = (1 - d.val_fraction) * o.epochs / speeds[cfg.method.name] + d.val_fraction * o.epochs / forward
        fixed, per_image = fixed + start + test, per_image + slope
        seconds += start + test + slope * (d.train_subset or whole[where])
    subsets = {cfg.data.train_subset for cfg in cells}
    common = subsets.pop() if len(subsets) == 1 else None
    sized = sum(cfg.data.train_subset is not None for cfg in cells)
    precision = resolve_precision(cells[0].optim.precision)
    return Estimate(fixed, per_image, common, seconds, sized, len(cells), speeds, precision, str(train_device()))


def training_images(cfg: TrainConfig) -> int:
    """The images a cell without a training subset draws its training and validation sets from."""
    d = cfg.data
    splits = load_splits(d.data, d.val_fraction, 0, d.part, size=cfg.backbone.img_size, splits=d.splits)
    return len(splits.train) + len(splits.val)


def train_device() -> torch.device:
    """Where the cells train: the GPU when there is one (Accelerate's choice in ``make_accelerator``)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_budget(
    out: Path, configs: list[TrainConfig], left: list[TrainConfig], minutes: float, est: Estimate | None
) -> dict | None:
    """The training subset that keeps the cells within ``minutes`` here, when the preset's does not.

    Chosen once, before the first cell, from ``est`` (of every cell), and kept in
    ``out/budget.json`` so that a rerun continues with the same size; a run whose first cells
    finished at the preset's size keeps it.
    """
    record = out / BUDGET_FILE
    if record.exists():
        return read_budget(record)
    if est is None or len(left) < len(configs):
        return None
    chosen = est.fit(minutes * 60)
    if chosen is None:
        return None
    resized = est.fixed + est.per_image * chosen
    budget = {
        "minutes": minutes,
        "train_subset": chosen,
        "preset_train_subset": est.train_subset,
        "estimate_min": round(est.seconds / 60, 1),
        "resized_estimate_min": round(resized / 60, 1),
        "speeds": {m: round(v, 1) for m, v in est.speeds.items()},
    }
    log.warning(
        "this machine is too slow for %d training images within %g minutes (estimate %.0f min; training img/s %s): "
        "every cell trains on %d instead (estimate %.0f min), as the results say; --minutes 0 in a new --out keeps %d",
        est.train_subset, minutes, est.seconds / 60, speeds_text(est.speeds), chosen, resized / 60, est.train_subset,
    )  # fmt: skip
    if resized > minutes * 60:
        log.warning("even %d images would take about %.0f min here", chosen, resized / 60)
    atomic_write_json(record, budget)
    return budget


def read_budget(record: Path) -> dict:
    """The budget a first run chose, checked: its training subset sizes every cell this folder still trains."""
    try:
        budget = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"budget record {record}: cannot be read ({exc})") from None
    size = budget.get("train_subset") if isinstance(budget, dict) else None
    if type(size) is not int or size < 1:
        raise ValueError(
            f"budget record {record}: no training subset (a whole number above 0) in it; it sizes the cells this "
            "folder's first run chose: restore it, or start again in another --out"
        )
    return budget


def cell_overhead_seconds(cfg: TrainConfig, spawn: bool = True) -> float:
    """Seconds a cell like ``cfg`` costs beyond its images, measured by running one on a few images:
    its process start and imports, reading and encrypting its data, building the model, writing
    checkpoints, results and plots (without it the estimate came 18-25% short of the cells); ``spawn`` as
    the cells run (``--one-process``: no process start to pay)."""
    with tempfile.TemporaryDirectory(prefix="ppvit-probe-") as tmp:
        batch = cfg.optim.batch_size  # two batches to train on, whatever is held out for validation
        subset = math.ceil(2 * batch / (1 - cfg.data.val_fraction))
        probe = cfg.replace(out=str(Path(tmp) / "probe"), epochs=1, train_subset=subset, test_subset=batch)
        t0 = time.perf_counter()
        try:
            run_cell(probe, spawn)
        except Exception as exc:
            raise ValueError(
                f"a trial cell ({cfg.method.name}, a few images) failed, so every cell would: "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        return time.perf_counter() - t0


def training_speed(cfg: TrainConfig, steps: int = 3, warmup: int = 1) -> float:
    """Images per second of ``cfg``'s training step here, on the cells' device: its model, batch (on a CPU at most
    64), input size and precision, compiled and with the optimiser as a run has them (``train.fast``), timed
    after ``warmup`` steps (a compiled model: at least 3, which compile and autotune) with the device drained.
    Random inputs, no cipher: a ``key_init`` cell is timed from the public weights (the same step)."""
    import torch
    import torch.nn.functional as F

    from ppvit.models.backbones import input_size
    from ppvit.train.build import build_model, param_groups
    from ppvit.train.fast import make_optimizer, maybe_compile

    cfg, device = cfg.resolved(), train_device()
    model = build_model(cfg.replace(key_init=False), 10).to(device).train()  # the key's transform costs no step
    net = maybe_compile(model, device, cfg.backbone.compile)
    opt = make_optimizer(param_groups(model, cfg), device)
    side, batch = input_size(model), cfg.optim.batch_size if device.type == "cuda" else min(cfg.optim.batch_size, 64)
    x, y = torch.rand(batch, 3, side, side, device=device), torch.randint(0, 10, (batch,), device=device)
    bf16 = resolve_precision(cfg.optim.precision) == "bf16"
    warmup = max(warmup, 3) if net is not model else warmup
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


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
