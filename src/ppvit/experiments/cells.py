"""A cell of a preset: its config, training it in a spawned process (its peak memory and crash its own; its
exception comes back with type and message), a run of cells in order, and a finished cell read back only when
it was trained with this run's settings."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ppvit.experiments.presets import Preset
from ppvit.experiments.results import Cell
from ppvit.train.config import TrainConfig
from ppvit.train.loop import TrainingStopped, train
from ppvit.train.runs import CONFIG_FILE, RESULT_FILE, RunResult, changed_settings

log = logging.getLogger(__name__)


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
                where = f"in the cell {cell.method} {cell.scheme} seed {cell.seed}, its checkpoint kept in {run}"
                raise rerun_continues(exc, where) from None
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


def rerun_continues(stopped: TrainingStopped, where: str) -> TrainingStopped:
    """A stop of training inside reproduce, said as reproduce continues it: training's own message says
    `--resume`, which reproduce has no need of (the same command skips finished work and resumes the rest)."""
    name = signal.Signals(stopped.signum).name
    return TrainingStopped(f"stopped by {name} {where}: the same reproduce command continues it", stopped.signum)
