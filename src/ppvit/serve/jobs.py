"""Training jobs of the service: a job is a ``TrainConfig`` on one of the tenant's uploaded datasets.

A submission is checked whole, at once: its settings against ``TrainConfig``'s types and
ranges (the one schema ``ppvit train`` reads), against the server's limits (allowed base
models and their weights, an operator's bound on every setting that sizes the machine's work:
:data:`JOB_BOUNDS`, jobs per tenant, optimiser steps over the images the server counted) and
against what the server can do without the key: settings
that need plain images (plain augmentation, ``key_init``) or a key are refused in one line,
as is ``full`` (it replaces the whole backbone and cannot be routed), and against the dataset (streamed
shards take no part or subset; a batch fits in the training images left after validation). The server fills in
what is its own (data folder, run folder, weights, scheme, block size and input size from
the dataset's manifest) and records the result as the job's ``config.yaml``.

States: queued -> running -> succeeded / failed / cancelled, kept in the store's SQLite. A
:class:`Runner` runs ``ppvit train --config JOB.yaml --resume`` processes; the embedded one
(:class:`LocalRunner`) runs them on this machine, one job per device slot: a job of several
processes runs them under ``torchrun`` on as many CUDA slots, or on one ``cpu`` slot (gloo).
:class:`~ppvit.serve.supervisor.Supervisor` (a thread of the server, :mod:`ppvit.serve.supervisor`)
starts queued jobs, watches running ones and registers a succeeded job's adapter; a dead
server's running jobs are queued again by the next one and ``--resume`` continues them.
:class:`RayRunner` submits the same command to a Ray cluster instead (its job submission API); both in
:mod:`ppvit.serve.runners`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ppvit._io import atomic_write_bytes, read_json
from ppvit._schema import lone_surrogate
from ppvit.serve.datasets import DATASETS_DIR, Dataset, private_dirs
from ppvit.serve.declarations import DatasetLimits
from ppvit.serve.defaults import MAX_CLASSES
from ppvit.serve.runners import LocalRunner, RayRunner, Runner
from ppvit.serve.service_db import ACTIVE, DatasetError, service_db
from ppvit.serve.tenants import TenantStore
from ppvit.train.config import TrainConfig
from ppvit.train.runs import BEST_FILE, CHECKPOINT_FILE, RESULT_FILE, RESULT_LIMIT

JOBS_DIR = "jobs"
# Settings that are the server's (filled in from its limits and the dataset), never the client's.
SERVER_SETTINGS = frozenset({"data", "out", "key", "weights", "pretrained", "quiet", "report_to"})
# Settings that need the key or plain images, which the server never has.
PLAIN_ONLY = {"key_init": "key_init needs the key", "augment": "plain augmentation needs plain images"}
# Settings that streamed WebDataset data, the service's every dataset, take none of (data.datasets.load_splits).
NOT_STREAMED = ("part", "train_subset", "test_subset")
LOG_TAIL_BYTES = 8192
LINE_CHARS = 500  # of a job's last log line or error, as the tenant sees it
JOBS_LISTED = 100  # GET /v1/jobs: the tenant's newest jobs
ROW = "SELECT id, dataset, state, config, activate, error, version, created, started, ended, processes FROM jobs"
# A job setting a tenant chooses that sizes the machine's work -> the ServiceLimits field bounding it
# (at most; ``min_save_every_steps``: at least). README: "Fine-tuning as a service", its limits table.
JOB_BOUNDS = {
    "epochs": "max_epochs",
    "batch_size": "max_batch_size",
    "grad_accum": "max_grad_accum",
    "rank": "max_rank",
    "loader_workers": "max_loader_workers",
    "dist_timeout_s": "max_dist_timeout_s",
}


@dataclass
class ServiceLimits:
    """What the server lets tenants train: base models (name -> weights file, None: the model's own
    initialisation), epochs, jobs, dataset bytes, device slots (one running job each)."""

    models: dict[str, str | None]
    max_epochs: int = 50
    max_steps: int | None = None  # optimiser steps of a job (epochs x batches of the training images)
    tenant_jobs: int = 2  # queued or running jobs of one tenant
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # "cpu" or a CUDA index; one running job each
    max_processes: int = 1  # training processes of one job (torchrun); on CUDA slots one device each
    quota_bytes: int = 10 << 30  # one tenant's uploaded datasets
    ray_address: str | None = None  # a Ray cluster's dashboard URL: jobs run there (RayRunner), not here
    max_batch_size: int = 256  # a job's global batch (memory)
    max_grad_accum: int = 16  # a job's gradient accumulation steps (memory of a step's batches, time)
    max_rank: int = 64  # a job's LoRA rank (memory, time)
    max_loader_workers: int = 4  # a job's shard-reading processes
    min_save_every_steps: int = 100  # a job's checkpoint cadence in steps (disk writes)
    max_dist_timeout_s: float = 600.0  # how long a job's processes wait for a hung peer, holding their slots
    max_datasets: int = 20  # datasets of one tenant
    max_shards: int = 10_000  # shards of one dataset
    max_classes: int = MAX_CLASSES  # classes of a dataset's split (a job's head)
    max_img_size: int = 512  # a dataset's input size (a job's model is built at it)
    jobs_kept: int = 50  # finished jobs of one tenant kept (rows, logs, metrics): older ones go at a submission

    def runner(self) -> Runner:
        return LocalRunner() if self.ray_address is None else RayRunner(self.ray_address)

    @property
    def datasets(self) -> DatasetLimits:
        return DatasetLimits(self.quota_bytes, self.max_datasets, self.max_shards, self.max_classes, self.max_img_size)

    def __post_init__(self) -> None:
        if self.jobs_kept < 1:
            raise ValueError(f"jobs kept: {self.jobs_kept}; at least 1 (a finished job is read back once)")

    def check_bounds(self, cfg: TrainConfig) -> None:
        """Every setting of :data:`JOB_BOUNDS` within the operator's bound (422 naming the first over)."""
        flat = {**cfg.flat(), "rank": getattr(cfg.method, "rank", None)}
        for name, bound in JOB_BOUNDS.items():
            if flat[name] is not None and flat[name] > getattr(self, bound):
                raise JobError(422, f"config: {name} {flat[name]}; this server allows at most {getattr(self, bound):g}")
        every = cfg.run.save_every_steps
        if every is not None and every < self.min_save_every_steps:
            least = self.min_save_every_steps
            raise JobError(422, f"config: save_every_steps {every}; this server allows at least {least}")

    def check_processes(self, processes: Any, batch_size: int) -> None:
        """A job's process count: within the server's limit, its devices there, the batch split evenly (422)."""
        cuda = [d for d in self.devices if d != "cpu"]
        most = self.max_processes if "cpu" in self.devices else min(self.max_processes, len(cuda))
        if not (type(processes) is int and 1 <= processes <= most):
            raise JobError(422, f"processes {processes}: this server runs 1 to {most} processes for a job")
        if batch_size % processes:
            raise JobError(422, f"processes {processes}: batch size {batch_size} does not split into equal shares")


class JobError(DatasetError):
    """A refused job request (``status``: its HTTP status)."""


def job_config(settings: Any, dataset: Dataset, limits: ServiceLimits, out: Path) -> TrainConfig:
    """The job's ``TrainConfig`` from the client's flat settings, or a one-line refusal (422): every
    setting checked now, so that nothing a client chose fails when the job runs."""
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise JobError(422, "config: a JSON object of `ppvit train` settings (flat names: epochs, lr, rank, ...)")
    where = lone_surrogate(settings)
    if where is not None:  # any setting, structured ones (splits) too
        raise JobError(422, f"config: {where[:80]}: a lone UTF-16 surrogate, which is not text")
    given = sorted(SERVER_SETTINGS & set(settings))
    if given:
        raise JobError(422, f"config: {', '.join(given)} are the server's to set, not the client's")
    if settings.get("key_init"):
        raise JobError(422, f"config: {PLAIN_ONLY['key_init']}, which the server never holds")
    if settings.get("augment", "none") != "none":
        raise JobError(422, f"config: {PLAIN_ONLY['augment']}; use mixup or cutmix (ciphertext-safe)")
    if settings.get("method") == "full":
        raise JobError(422, "config: method full replaces the whole backbone; it cannot be served (use lora-pe)")
    for name in NOT_STREAMED:
        if settings.get(name) is not None:
            raise JobError(
                422,
                f"config: {name} {str(settings[name])[:40]}: the service's datasets are streamed WebDataset shards, "
                f"which take no {', '.join(NOT_STREAMED)}",
            )
    m = dataset.manifest
    fixed = {"scheme": m.scheme, "block_size": m.block_size, "img_size": m.size}
    for name, value in fixed.items():
        if settings.get(name) is not None and settings[name] != value:
            raise JobError(422, f"config: {name} {str(settings[name])[:40]} differs from the dataset's {value}")
    model = settings.get("model")
    allowed = ", ".join(sorted(limits.models))
    if model is None and len(limits.models) == 1:  # the one model offered needs no naming
        model = next(iter(limits.models))
    elif model is None:
        raise JobError(422, f"config: no model given; this server offers {allowed}: choose one with --model")
    if not isinstance(model, str) or model not in limits.models:
        raise JobError(422, f"config: model {str(model)[:40]!r} is not offered here (allowed: {allowed})")
    weights = limits.models[model]
    try:
        cfg = TrainConfig.from_flat(
            **{**settings, **fixed, "model": model},
            data=str(dataset.folder),
            out=str(out),
            weights=weights,
            pretrained=False if weights else None,
            quiet=False,  # its progress bar is the job's log: the last line says the step
        )
    except (TypeError, ValueError) as exc:
        raise JobError(422, f"config: {exc}") from None
    if cfg.data.val_fraction == 0:  # not refused by TrainConfig: a job row of an earlier release may hold it
        raise JobError(422, "config: val_fraction 0: training splits off a validation share; give one above 0")
    if cfg.backbone.compile and all(d == "cpu" for d in limits.devices):
        raise JobError(
            422,
            "config: compile true: this server trains on CPUs only, where torch.compile costs more than it wins; "
            "leave it out",
        )
    limits.check_bounds(cfg)
    dataset.check_counts()
    check_batch(cfg, dataset)
    steps = cfg.optim.epochs * math.ceil(train_images(cfg, dataset) / (cfg.optim.batch_size * cfg.optim.grad_accum))
    if limits.max_steps is not None and steps > limits.max_steps:
        raise JobError(422, f"config: about {steps} optimiser steps; this server allows {limits.max_steps}")
    return cfg.resolved()


def train_images(cfg: TrainConfig, dataset: Dataset) -> int:
    """About the training images a run of ``cfg`` steps over (the validation share held out), as the server
    counted them in the shards it received: an estimate of the steps (:func:`check_batch` counts exactly)."""
    return max(1, round(dataset.counts.get("train", 0) * (1 - cfg.data.val_fraction)))


def check_batch(cfg: TrainConfig, dataset: Dataset) -> None:
    """A batch fits in the training images (422 naming batch_size and val_fraction): those of the received train
    shards that training's own rule leaves out of validation (:func:`~ppvit.data.streaming.is_val`, a hash of each
    sample's key), counted in tar headers up to a batch's worth. Else the job failed when it ran."""
    from ppvit.data.sources.encrypted_wds import EncryptedWds
    from ppvit.data.sources.wds import count_samples
    from ppvit.data.streaming import is_val

    batch, share = cfg.optim.batch_size, cfg.data.val_fraction
    try:
        shards = EncryptedWds(dataset.folder).shard_files("train")  # as training lists them
        held = count_samples(shards, lambda key: not is_val(key, share), most=batch)
    except OSError:  # its files gone meanwhile (the message names the server's paths)
        raise JobError(409, f"dataset {dataset.name}: deleted or declared again meanwhile; submit again") from None
    except ValueError:  # a stored shard damaged on the server's disk: submitting again would not help
        raise JobError(
            409, f"dataset {dataset.name}: a stored shard cannot be read; delete it and upload again"
        ) from None
    if held < batch:
        raise JobError(
            422,
            f"config: batch_size {batch} is larger than the training set: val_fraction {share:g} leaves {held} of "
            f"the {dataset.counts.get('train', 0)} train images",
        )


def redact(text: str, private: dict[str, str]) -> str:
    """``text`` as a tenant may read it: the server's paths replaced (``private``), at most ``LINE_CHARS``."""
    for path, label in private.items():
        text = text.replace(path, label)
    return text if len(text) <= LINE_CHARS else text[: LINE_CHARS - 3] + "..."


def last_line(path: Path) -> str:
    """The last non-empty line of a log (a progress bar's last redraw counts as a line)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [s.strip() for s in tail.replace("\r", "\n").split("\n") if s.strip()]
    return lines[-1] if lines else ""


def drop_checkpoints(folder: Path) -> None:
    """A finished job's checkpoints, its largest files: it is never resumed, and its adapter is registered."""
    for name in (CHECKPOINT_FILE, BEST_FILE):
        (folder / "run" / name).unlink(missing_ok=True)


class Jobs:
    """Job records of one server root, per tenant; the :class:`Supervisor` moves them along."""

    def __init__(self, root: Path, limits: ServiceLimits) -> None:
        self.root, self.limits = Path(root), limits

    def folder(self, job_id: str) -> Path:
        return self.root / JOBS_DIR / job_id

    def submit(
        self, tenant_id: int, dataset: Dataset, settings: Any, activate: bool, processes: Any = 1
    ) -> dict[str, Any]:
        if not dataset.complete:
            raise JobError(409, f"dataset {dataset.name}: {len(dataset.missing)} shards not uploaded yet")
        if not isinstance(activate, bool):
            raise JobError(422, "activate: true or false")
        job_id = "job-" + secrets.token_hex(6)
        folder = self.folder(job_id)
        cfg = job_config(settings, dataset, self.limits, folder / "run")
        self.limits.check_processes(processes, cfg.optim.batch_size)
        with service_db(self.root) as con:
            busy = con.execute(
                "SELECT COUNT(*) FROM jobs WHERE tenant_id = ? AND state IN (?, ?)", (tenant_id, *ACTIVE)
            ).fetchone()[0]
            if busy >= self.limits.tenant_jobs:
                raise JobError(429, f"{busy} jobs queued or running; this server takes {self.limits.tenant_jobs}")
            declared = con.execute(
                "SELECT created FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, dataset.name)
            ).fetchone()
            if declared is None or declared[0] != dataset.declared:  # deleted (and declared again) meanwhile
                raise JobError(409, f"dataset {dataset.name}: deleted or declared again meanwhile; submit again")
            try:
                private_dirs(folder)
                atomic_write_bytes(folder / "config.yaml", cfg.dump().encode(), mode=0o600)
            except OSError as exc:
                raise JobError(507, f"job {job_id}: cannot be stored ({exc.strerror or exc})") from None
            con.execute(
                "INSERT INTO jobs (id, tenant_id, dataset, state, config, activate, processes, created) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, tenant_id, dataset.name, cfg.dump(), int(activate), processes, time.time()),
            )
            old = [  # finished jobs past the newest kept: their rows and folders (outside every quota) go
                r[0]
                for r in con.execute(
                    "SELECT id FROM jobs WHERE tenant_id = ? AND state NOT IN (?, ?) "
                    "ORDER BY COALESCE(ended, created) DESC LIMIT -1 OFFSET ?",  # a long job just ended is kept
                    (tenant_id, *ACTIVE, self.limits.jobs_kept),
                )
            ]
            con.executemany("DELETE FROM jobs WHERE id = ?", [(j,) for j in old])
        for j in old:  # after the rows: a server stopped in between leaves folders that the next one sweeps
            shutil.rmtree(self.folder(j), ignore_errors=True)
        return self.get(tenant_id, job_id)

    def sweep(self) -> None:
        """At start, before any submission: remove the folders of jobs that have no row (pruned, or their tenant
        removed, by a server stopped before it removed them) and the checkpoints of finished jobs (a server stopped
        before it removed them, or an earlier release: it kept them)."""
        with service_db(self.root) as con:
            states = dict(con.execute("SELECT id, state FROM jobs").fetchall())
        for folder in (self.root / JOBS_DIR).glob("job-*"):
            if folder.name not in states:
                shutil.rmtree(folder, ignore_errors=True)
            elif states[folder.name] not in ACTIVE:
                drop_checkpoints(folder)

    def _row(self, con: Any, tenant_id: int, job_id: str) -> tuple:
        row = con.execute(f"{ROW} WHERE id = ? AND tenant_id = ?", (job_id, tenant_id)).fetchone()
        if row is None:
            raise JobError(404, f"no job {job_id[:40]}")
        return row

    def get(self, tenant_id: int, job_id: str) -> dict[str, Any]:
        """The job's state, progress (last epoch of metrics.jsonl) and last log line; 404 if not the tenant's."""
        with service_db(self.root) as con:
            row = self._row(con, tenant_id, job_id)
        return self._describe(tenant_id, row)

    def _describe(self, tenant_id: int, row: tuple) -> dict[str, Any]:
        jid, dataset, state, config, activate, error, version, created, started, ended, processes = row
        cfg = TrainConfig.from_dict(yaml.safe_load(config))
        private = self.private_paths(cfg, tenant_id, dataset)
        metrics = self.metrics(jid)
        last = metrics[-1] if metrics else {}
        result = self.result(jid) if state == "succeeded" else {}
        epochs = cfg.optim.epochs
        eta = None
        if state == "running" and last and started:
            eta = (time.time() - started) / last["epoch"] * (epochs - last["epoch"])
        return {
            "id": jid,
            "dataset": dataset,
            "state": state,
            "method": cfg.method.name,
            "model": cfg.backbone.model,
            "activate": bool(activate),
            "processes": processes,
            "epoch": last.get("epoch", 0),
            "epochs": epochs,
            "train_loss": last.get("train_loss"),
            "val_acc": last.get("val_acc"),
            "test_acc": result.get("test_acc"),  # the run's result.json: its test split, on the server
            "test_images": result.get("test_images"),
            "eta_s": eta,
            "log": redact(last_line(self.folder(jid) / "log.txt"), private),
            "error": error and redact(error, private),
            "version": version,
            "created": created,
            "started": started,
            "ended": ended,
        }

    def private_paths(self, cfg: TrainConfig, tenant_id: int, dataset: str) -> dict[str, str]:
        """The server's paths a job's log may name -> what the tenant is shown instead (longest first)."""
        named = {
            cfg.data.data: f"<dataset {dataset}>",
            cfg.run.out: "<run>",
            cfg.backbone.weights: f"<weights of {cfg.backbone.model}>",
            str(self.root / DATASETS_DIR / str(tenant_id)): "<datasets>",
            str(self.root): "<server>",
        }
        out = {}
        for path, label in named.items():
            if path:  # absolute only: a relative root ("srv") would replace that word anywhere
                out[str(Path(path).absolute())] = out[str(Path(path).resolve())] = label
        return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        try:
            text = (self.folder(job_id) / "run" / "metrics.jsonl").read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):  # a line being written as we read
                out.append(json.loads(line))
        return out

    def result(self, job_id: str) -> dict[str, Any]:
        """The finished run's result.json ({} if unreadable: the job's state says why)."""
        try:
            return read_json(self.folder(job_id) / "run" / RESULT_FILE, RESULT_LIMIT)
        except (OSError, ValueError):
            return {}

    def list(self, tenant_id: int) -> list[dict[str, Any]]:
        """The tenant's newest jobs, oldest first, read in one transaction (a transaction each held the store's
        write lock a hundred times per listing: a tenant listing in a loop slowed every other tenant)."""
        with service_db(self.root) as con:
            rows = con.execute(f"{ROW} WHERE tenant_id = ? ORDER BY created DESC LIMIT ?", (tenant_id, JOBS_LISTED))
            rows = rows.fetchall()
        return [self._describe(tenant_id, row) for row in reversed(rows)]

    def cancel(self, tenant_id: int, job_id: str) -> dict[str, Any]:
        """Ask for the job to stop: a queued one is cancelled at once, a running one at its next step."""
        with service_db(self.root) as con:
            state = self._row(con, tenant_id, job_id)[2]
            if state not in ACTIVE:
                raise JobError(409, f"job {job_id}: already {state}")
            if state == "queued":
                con.execute("UPDATE jobs SET state = 'cancelled', ended = ? WHERE id = ?", (time.time(), job_id))
            else:
                con.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
        return self.get(tenant_id, job_id)

    def activate(self, tenant_id: int, job_id: str, tenants: TenantStore) -> dict[str, Any]:
        """Serve the tenant with the adapter version this job registered."""
        with service_db(self.root) as con:
            row = self._row(con, tenant_id, job_id)
            name = con.execute("SELECT name FROM tenants WHERE id = ?", (tenant_id,)).fetchone()[0]
        if row[2] != "succeeded" or row[6] is None:
            raise JobError(409, f"job {job_id}: {row[2]}, no adapter to activate")
        try:
            tenants.activate(name, row[6])
        except ValueError as exc:
            raise JobError(409, str(exc)) from None
        return self.get(tenant_id, job_id)
