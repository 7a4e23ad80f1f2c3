"""How long a preset's cells take here (measured before the first one), and the training subset that keeps
them within a time budget: chosen once, recorded in the output folder, kept by every rerun."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ppvit._io import atomic_write_json, read_json
from ppvit.data.datasets import load_splits
from ppvit.experiments.cells import run_cell
from ppvit.experiments.results import speeds_text
from ppvit.train.config import TrainConfig
from ppvit.train.runtime import resolve_precision

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
        budget = read_json(record)
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
