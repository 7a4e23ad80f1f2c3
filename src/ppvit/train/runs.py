"""A run folder on disk: its config, checkpoint, best weights, metrics, curves and result.

OUT/config.yaml      the run's TrainConfig (written once its inputs are checked: it marks the folder)
OUT/checkpoint.pt    trained tensors + optimiser + RunState, replaced atomically
OUT/best.pt          trained tensors of the epoch with the best validation accuracy
OUT/metrics.jsonl    one line per epoch; OUT/curves.png the same as curves
OUT/adapter/         the adapter (safetensors + JSON), see :mod:`ppvit.models.adapters`
OUT/result.json      the :class:`RunResult`
OUT/.lock            held (flock) by the ``train`` writing the folder: a second one is refused
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ppvit._io import (
    LockHeld,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    hold_lock,
    json_text,
    read_json,
    remove_empty_folders,
)
from ppvit._schema import check_fields
from ppvit.models.adapters import adapter_files, trainable_tensors
from ppvit.train.config import IGNORED_ON_RESUME, TrainConfig

EXTENDABLE = (*IGNORED_ON_RESUME, "epochs")  # settings a resume may change (epochs: see plan_schedules)

CONFIG_FILE, CHECKPOINT_FILE, BEST_FILE, RESULT_FILE = "config.yaml", "checkpoint.pt", "best.pt", "result.json"
LOCK_FILE = ".lock"
RESULT_LIMIT = 1 << 30  # result.json lists every image left out, whole: 130,000 took 17 MB (read_json's bound: 16 MB)


class RunFolderBusy(ValueError):
    """Another process is training into the same run folder."""


@dataclass
class RunState:
    """Where a run stands: saved in every checkpoint, so that ``--resume`` continues exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0  # micro-batches consumed
    best_val_acc: float = -1.0
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch (a diverged run's losses: not finite)
    partial: dict[str, Any] | None = None  # running sums of an epoch checkpointed part-way
    # the learning-rate schedules, oldest first: {start_epoch, start_step, epochs (the run's length under it)};
    # a resume with a larger --epochs adds one (see :func:`plan_schedules`)
    schedules: list[dict[str, int]] = field(default_factory=list)
    # what the run trains on: {"key_fingerprint": its cipher's or its data manifest's (None: plain), "classes": [...]}
    # (config.yaml names the key file, not its content: a key swapped at that path was trained on; None: a
    # checkpoint written before this was recorded)
    trained_on: dict[str, Any] | None = None


@dataclass
class RunResult:
    """What a finished run reports (``result.json``)."""

    test_acc: float
    test_loss: float | None  # None: read back from JSON, where a loss that is not finite (diverged) is null
    test_images: int
    best_epoch: int | None
    best_val_acc: float | None  # None: no validation split (the last epoch is the one kept)
    epochs: int
    method: str
    scheme: str
    num_classes: int
    trainable_params: int
    train_seconds: float
    images_per_s: float | None
    peak_rss_mb: float
    processes: int
    precision: str
    unreadable: dict[str, str] = field(default_factory=dict)  # images left out, each with why: path -> problem
    schedules: list[dict[str, int]] = field(default_factory=list)  # RunState.schedules: more than one if extended

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunResult:
        """The result as written, checked: a table or an answer built on ``test_acc: 5`` said 500% (hand edits)."""
        try:
            result = cls(**read_json(path, RESULT_LIMIT))
        except OSError as exc:
            raise ValueError(f"run result {path}: cannot be read ({exc.strerror or exc})") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"run result {path}: cannot be read ({exc})") from None
        check_fields(result, f"run result {path}: ")
        for name in ("test_acc", "best_val_acc"):
            value = getattr(result, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"run result {path}: {name} {value!r}: must be a fraction from 0 to 1")
        return result

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, dataclasses.asdict(self))


def adapter_dir(path: str | os.PathLike) -> Path:
    """A run folder or its adapter folder, given either (the one rule every command uses)."""
    p = Path(path)
    return p / "adapter" if adapter_files(p / "adapter")[0].exists() else p


def adapter_and_weights(path: str | os.PathLike, weights: str | os.PathLike | None) -> tuple[Path, str | None]:
    """The adapter folder of a run folder or adapter folder, and its base weights file.

    Explicit ``weights`` win; otherwise those the run recorded in its config.yaml (an adapter
    folder's run is the folder above it), so that eval, predict and merge need no ``--weights``
    that training already had. A recorded file that is gone is one clear error.
    """
    adapter = adapter_dir(path)
    recorded = adapter.parent / CONFIG_FILE
    if weights is not None or not recorded.is_file():
        return adapter, None if weights is None else str(weights)
    found = TrainConfig.load(recorded).backbone.weights
    if found is not None and not Path(found).is_file():
        raise FileNotFoundError(
            f"weights file {found}: recorded in {recorded} but not found; pass --weights with the base weights"
        )
    return adapter, found


def lock_run_folder(out: Path, what: str = "run folder", command: str = "train") -> IO[str]:
    """Hold an exclusive lock on ``OUT/.lock`` until the returned file is closed (or the process ends).

    Two runs writing one folder would overwrite each other's checkpoints (two ``reproduce``: one's cleanup
    deleted the key the other's cells used); the second is refused. A file system without locks is named.
    """
    try:
        return hold_lock(out / LOCK_FILE)
    except LockHeld as held:
        raise RunFolderBusy(
            f"{what} {out}: in use by another `ppvit {command}`{f' (pid {held.holder})' if held.holder else ''}; "
            "wait for it to end or choose another --out"
        ) from None
    except OSError as exc:  # e.g. ENOLCK on a network file system: said with the file, not "No locks available"
        raise OSError(exc.errno, f"cannot be locked ({exc.strerror})", str(out / LOCK_FILE)) from None


def remove_empty_run_folder(out: Path, created: Path | None) -> None:
    """Remove ``out`` if it holds nothing but the lock file (a run refused before it wrote anything), and
    its parents up to ``created`` (the first folder this run made: ``runs/`` of ``runs/run``) left empty."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
        (out / LOCK_FILE).unlink(missing_ok=True)
        remove_empty_folders(out, created)


def check_run_folder(out: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse to mix two runs in one folder; on resume, the saved config must match."""
    saved = out / CONFIG_FILE
    if not saved.exists():
        return
    if not resume:
        raise ValueError(f"run folder {out}: already holds a run; pass --resume to continue it or choose another --out")
    changed = changed_settings(out, cfg, EXTENDABLE)
    if changed:
        raise ValueError(
            f"run folder {out}: --resume with different settings ({', '.join(changed)}): a run keeps its settings "
            "(only a larger --epochs, which extends it); drop those flags, or start a new run with another --out"
        )


def changed_settings(out: Path, cfg: TrainConfig, allowed: tuple[str, ...] = IGNORED_ON_RESUME) -> list[str]:
    """The settings of resolved ``cfg`` that differ from the run's in ``out`` (its config.yaml), but ``allowed``."""
    old, new = TrainConfig.load(out / CONFIG_FILE).resolved().flat(), cfg.flat()  # resolved: runs saved before 0.3
    return [k for k in sorted(set(old) | set(new)) if k not in allowed and old.get(k) != new.get(k)]


def plan_schedules(state: RunState, epochs: int, saved_epochs: int | None, out: Path) -> bool:
    """Set ``state.schedules`` for a run of ``epochs``; True when this resume extends the run.

    A run starts with one schedule (warm-up, then cosine to 0 at its last epoch). A resume with
    another ``--epochs`` than the schedule in force ends at starts a new one at the checkpoint (the
    last weights and optimiser state, not the best epoch's): warm-up and cosine again, from the
    checkpoint's step to epoch ``epochs``, so a finished run whose rate had decayed to 0 learns again.
    ``saved_epochs``: the run's own length, for a checkpoint written before schedules were recorded.
    """
    if state.step == 0:  # nothing trained yet: the run simply has its new length
        state.schedules = [{"start_epoch": 0, "start_step": 0, "epochs": epochs}]
    elif not state.schedules:  # a checkpoint written before schedules were recorded
        state.schedules = [{"start_epoch": 0, "start_step": 0, "epochs": saved_epochs or epochs}]
    if state.schedules[-1]["epochs"] == epochs:
        return False
    if epochs <= state.epoch:
        raise ValueError(
            f"run folder {out}: has trained {state.epoch} epochs; --epochs {epochs} would not extend it: give "
            f"more than {state.epoch} to train on, or leave --epochs out"
        )
    state.schedules.append({"start_epoch": state.epoch, "start_step": state.step, "epochs": epochs})
    return True


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
    """One file, written to a temporary name and renamed: never a half-written checkpoint."""
    payload = {"model": trainable_tensors(model), "optimizer": optimizer.state_dict(), **dataclasses.asdict(state)}
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))


def _torch_save(obj: object, tmp: Path) -> None:
    """``torch.save`` through a Python file: a full disk is ``OSError`` ENOSPC, not a RuntimeError from
    torch's own writer (``unexpected pos ...``)."""
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trained_on: dict[str, Any] | None = None
) -> RunState:
    """Restore the trained tensors and the optimiser in place; returns the saved state. ``trained_on``: what this
    run trains on (:attr:`RunState.trained_on`), which the checkpoint's must be. A file that is not what
    :func:`save_checkpoint` wrote, or another run's, is one line naming it."""
    payload = _read_torch_file(path, "checkpoint", weights_only=False)
    if not isinstance(payload, dict) or not {"model", "optimizer"} <= set(payload):
        raise ValueError(f"checkpoint {path}: damaged (not a ppvit checkpoint)")
    tensors, optimizer_state = payload.pop("model"), payload.pop("optimizer")
    try:
        state = RunState(**payload)
        check_fields(state, "")
        for name in ("epoch", "step"):
            if getattr(state, name) < 0:
                raise ValueError(f"{name} {getattr(state, name)}: must not be negative")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}: damaged ({exc})") from None
    saved = state.trained_on if trained_on is not None else None  # None: a caller that states nothing to check
    for what, word in (("key_fingerprint", "key fingerprint"), ("classes", "classes")):
        if saved is not None and saved.get(what) != trained_on[what]:
            raise ValueError(
                f"checkpoint {path}: trained with {word} {_shown(saved.get(what))}, this run has "
                f"{_shown(trained_on[what])}: resume with the run's own key and data, or start a new run"
            )
    check_tensors(path, "checkpoint", model, tensors)
    load_tensors(model, tensors)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {path}: its optimiser state does not fit this run ({exc})") from None
    state.trained_on = trained_on or state.trained_on
    return state


def _shown(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_torch_file(path: Path, what: str, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.__class__.__name__})") from None


def check_tensors(path: Path, what: str, model: torch.nn.Module, tensors: Any) -> None:
    """``tensors`` are this run's trained tensors by name, each of its parameter's shape (a head of other classes
    otherwise failed in ``copy_``, a traceback)."""
    expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}  # what trainable_tensors saves
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{what} {path}: damaged (not a mapping of names to tensors)")
    odd = sorted(set(expected) ^ set(tensors))
    if odd:
        raise ValueError(f"{what} {path}: does not match this run's method ({odd[:3]} ...)")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"{what} {path}: {name} has shape {tuple(tensors[name].shape)}, this run's {tuple(shape)} "
                "(another model, or other classes)"
            )


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy named tensors into the model's parameters (in place, no gradient)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            named[n].copy_(t)


def save_best(out: Path, model: torch.nn.Module) -> None:
    atomic_write(out / BEST_FILE, lambda tmp: _torch_save(trainable_tensors(model), tmp))


def load_best(out: Path, model: torch.nn.Module) -> None:
    tensors = _read_torch_file(out / BEST_FILE, "best weights", weights_only=True)
    check_tensors(out / BEST_FILE, "best weights", model, tensors)
    load_tensors(model, tensors)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl (one line per epoch) and curves.png (loss and accuracy per epoch)."""
    atomic_write_text(out / "metrics.jsonl", "".join(json_text(r, indent=None) for r in history))
    from matplotlib.figure import Figure  # only when a run writes its curves: eval and predict need none

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.5))  # not pyplot: no global backend or figure registry touched
    ax1, ax2 = fig.subplots(1, 2)
    for split in ("train", "val"):  # markers: a one-epoch run is one point, which a bare line does not draw
        ax1.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        ax2.plot(epochs, [r[f"{split}_acc"] for r in history], marker="o", label=split)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax1.set_xticks(epochs)
    ax2.set_xticks(epochs)
    ax1.legend()
    fig.suptitle(out.name)
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
