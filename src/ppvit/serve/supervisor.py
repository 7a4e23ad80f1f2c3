"""The server's job thread and a tenant's removal: who starts, watches, finishes and stops job processes.

:class:`Supervisor` (a thread of the server) starts queued jobs of :mod:`ppvit.serve.jobs` on
free device slots through a :class:`~ppvit.serve.runners.Runner`, watches running ones and, on
success, registers the adapter as a new adapter version of the tenant (activated if asked). A
process that dies fails its job with its last log line. The server's own death kills its
processes (Linux ``PR_SET_PDEATHSIG``); the next server finds their jobs still "running", queues
them again and their ``--resume`` continues from the last checkpoint. :func:`remove_tenant`
stops a tenant's jobs through the same rows before it deletes anything.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ppvit._io import LockHeld, hold_lock
from ppvit.serve.datasets import DATASETS_DIR
from ppvit.serve.jobs import JOBS_DIR, Jobs, drop_checkpoints, last_line
from ppvit.serve.runners import Runner
from ppvit.serve.service_db import ACTIVE, service_db
from ppvit.serve.tenants import TenantStore, hash_token, new_token

log = logging.getLogger(__name__)


SUPERVISOR_LOCK = "jobs.lock"


@contextmanager
def sole_supervisor(root: Path) -> Iterator[None]:
    """Hold the folder's job service for this process: a second server with training on over the same folder would
    re-queue the first one's running jobs as a dead server's and start them again beside them (two trainings
    writing one job folder); it is refused in one line. Inference alone may share a folder."""
    try:
        lock = hold_lock(root / SUPERVISOR_LOCK)
    except LockHeld as held:
        who = f" (pid {held.holder})" if held.holder else ""
        raise ValueError(
            f"{root}: another ppvit serve{who} runs the training service on this folder (one such server a folder)"
        ) from None
    with lock:
        yield


def remove_tenant(root: str | os.PathLike, name: str, wait_s: float = 120.0) -> None:
    """Remove a tenant with everything it has here: token, adapter versions, datasets and jobs.

    Its token is revoked and its jobs stop first: queued ones are cancelled, running ones asked to
    cancel, which the server's supervisor does (SIGTERM, then it marks them); only then are files and
    rows deleted (the rows last: a removal cut short is run again), so no process writes into a folder
    being removed. A running job whose local process is gone (no server up) is not waited for, nor, after
    ``wait_s``, one with no process recorded (a local one its server died while starting: gone with it);
    one still alive after ``wait_s`` refuses the removal in one line, with nothing deleted but the token.
    """
    root = Path(root)
    store = TenantStore(root, create=False)
    with service_db(root) as con:
        row = con.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ValueError(f"no tenant {name}")
        tenant_id = row[0]
        con.execute("UPDATE tenants SET token_sha256 = ? WHERE id = ?", (hash_token(new_token()), tenant_id))
    deadline = time.monotonic() + wait_s
    while True:
        with service_db(root) as con:  # each round: a job submitted by a request let in before the revoke, too
            con.execute(
                "UPDATE jobs SET state = 'cancelled', ended = ? WHERE tenant_id = ? AND state = 'queued'",
                (time.time(), tenant_id),
            )
            con.execute("UPDATE jobs SET cancel = 1 WHERE tenant_id = ? AND state = 'running'", (tenant_id,))
            jobs = con.execute("SELECT id, state, handle FROM jobs WHERE tenant_id = ?", (tenant_id,)).fetchall()
            late = time.monotonic() > deadline
            running = [job_id for job_id, state, handle in jobs if state == "running" and _alive(handle, late)]
            if not running:  # the last round: no job submitted after it (its dataset gone), none started
                con.execute("DELETE FROM datasets WHERE tenant_id = ?", (tenant_id,))
        if not running:
            break
        if late:
            raise ValueError(f"tenant {name}: job {running[0]} still running after {wait_s:g} s; is the server up?")
        time.sleep(0.5)
    for job_id, _, _ in jobs:
        shutil.rmtree(root / JOBS_DIR / job_id, ignore_errors=True)
    shutil.rmtree(root / DATASETS_DIR / str(tenant_id), ignore_errors=True)
    store.remove(name)  # its adapters; its rows of datasets, shards and jobs go with it (ON DELETE CASCADE)
    # again: a declaration let in before the revoke may have committed (and written its folder) since the first
    # rmtree; none can once the tenant's row is gone
    shutil.rmtree(root / DATASETS_DIR / str(tenant_id), ignore_errors=True)


def _alive(handle: str | None, late: bool) -> bool:
    """Whether a job's process may still run: a local one by its pid, a cluster's as far as we know; none
    recorded: a server is starting it (a cluster's is recorded before its start), until ``late``."""
    if handle is None:
        return not late
    if not handle.startswith("local:"):
        return True
    try:
        os.kill(int(handle.removeprefix("local:")), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Supervisor:
    """The server's job thread: starts queued jobs on free device slots, watches and finishes running ones.

    Processes are started from this one thread, which lives as long as the server: a process
    started with ``PR_SET_PDEATHSIG`` dies with the thread that started it.
    """

    def __init__(self, jobs: Jobs, tenants: TenantStore, runner: Runner | None = None, interval: float = 0.5) -> None:
        self.jobs, self.tenants = jobs, tenants
        self.runner = runner or jobs.limits.runner()
        self.interval = interval
        self.slots: dict[str, list[str]] = {}  # job id -> its devices ("cpu" once per process, or CUDA indices)
        self.handles: dict[str, str] = {}  # job id -> runner handle
        self.exits: dict[str, int] = {}  # job id -> its exit code, until its end is written (a poll says it once)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by a submitted job or an ended process: step at once
        self.runner.on_exit(self.wake)
        self._thread = threading.Thread(target=self._run, name="ppvit-jobs", daemon=True)

    def wake(self) -> None:
        """Step now rather than at the next poll (a job was submitted or cancelled, a process ended)."""
        self._wake.set()

    def start(self) -> None:
        """Take over an earlier server's running jobs: adopted where the runner still has them, on the slots
        they had (placed afresh, in another order, one could find none and be started again beside itself),
        else queued again (``--resume`` continues them from their last checkpoint), or cancelled if asked."""
        with service_db(self.jobs.root) as con:
            running = con.execute(
                "SELECT id, handle, processes, devices FROM jobs WHERE state = 'running' ORDER BY created"
            ).fetchall()
        for job_id, handle, processes, devices in running:
            if handle is not None and self.runner.adopt(handle):
                self.handles[job_id] = handle
                self.slots[job_id] = devices.split(",") if devices else self._free(processes) or []
                continue
            with service_db(self.jobs.root) as con:  # its handle kept: Runner.plan uses a cluster's id again
                con.execute(
                    "UPDATE jobs SET state = CASE WHEN cancel THEN 'cancelled' ELSE 'queued' END, "
                    "ended = CASE WHEN cancel THEN ? END WHERE id = ?",
                    (time.time(), job_id),
                )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(60)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:  # a bad row or a full disk: logged, the server keeps serving
                    log.exception("job supervisor")
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            self.runner.shutdown()  # from this thread: the processes' parent

    def step(self) -> None:
        with service_db(self.jobs.root) as con:
            rows = con.execute(
                "SELECT j.id, j.state, j.cancel, j.activate, j.processes, t.name FROM jobs j "
                "JOIN tenants t ON t.id = j.tenant_id WHERE j.state IN (?, ?) ORDER BY j.created",
                ACTIVE,
            ).fetchall()
        for job_id, state, cancel, activate, processes, tenant in rows:
            if state == "running" and job_id in self.handles:
                if cancel:
                    self.runner.cancel(self.handles[job_id])
                code = self.exits.get(job_id)
                code = self.runner.poll(self.handles[job_id]) if code is None else code
                if code is not None:
                    self.exits[job_id] = code
                    self._finish(job_id, code, bool(cancel), bool(activate), tenant)
            elif state == "queued":
                devices = self._free(processes)
                if devices is not None:
                    self._launch(job_id, devices)
        for job_id in set(self.handles) - {row[0] for row in rows}:  # its tenant removed: stop it, free its slot
            self.runner.cancel(self.handles[job_id])
            if self.runner.poll(self.handles[job_id]) is not None:
                del self.handles[job_id], self.slots[job_id]
                self.exits.pop(job_id, None)

    def _free(self, processes: int) -> list[str] | None:
        """Devices for a job of ``processes``: as many free CUDA slots, else a free ``cpu`` slot (None: wait)."""
        busy = {d for devices in self.slots.values() for d in devices}
        free = [d for d in self.jobs.limits.devices if d not in busy]
        cuda = [d for d in free if d != "cpu"]
        if len(cuda) >= processes:
            return cuda[:processes]
        return ["cpu"] * processes if "cpu" in free else None

    def _launch(self, job_id: str, devices: list[str]) -> None:
        """Claim the job (queued -> running) before its process starts, so a cancel that lands meanwhile finds
        it running and asks its process to stop: writing 'running' after the start overwrote such a cancel's
        'cancelled', and the job trained to its end. A job cancelled before the claim is not started."""
        with service_db(self.jobs.root) as con:
            planned = self.runner.plan(
                job_id, con.execute("SELECT handle FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            )
            claimed = con.execute(
                "UPDATE jobs SET state = 'running', devices = ?, handle = ?, started = COALESCE(started, ?) "
                "WHERE id = ? AND state = 'queued' AND cancel = 0",
                (",".join(devices), planned, time.time(), job_id),
            ).rowcount
        if not claimed:
            return
        folder = self.jobs.folder(job_id)
        try:
            handle = self.runner.start(job_id, folder / "config.yaml", folder / "log.txt", devices, planned)
        except Exception as exc:  # no process (a full disk, a cluster that refuses the job): it fails
            with service_db(self.jobs.root) as con:
                con.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, ended = ?, handle = NULL WHERE id = ?",
                    (f"could not be started: {exc}", time.time(), job_id),
                )
            return
        self.handles[job_id], self.slots[job_id] = handle, devices
        if handle != planned:  # a local process's pid (a server stopped before this line: it died with it)
            with service_db(self.jobs.root) as con:
                con.execute("UPDATE jobs SET handle = ? WHERE id = ?", (handle, job_id))

    def _finish(self, job_id: str, code: int, cancelled: bool, activate: bool, tenant: str) -> None:
        """Record the job's end; on success its adapter's new version and the job's 'succeeded' in one
        transaction (a server dying between the two registered the adapter again at its next start). Its
        slot is freed once that is written: a failure to write leaves the job to finish at the next step."""
        folder = self.jobs.folder(job_id)
        state, error = "succeeded", None
        if cancelled:
            state = "cancelled"
        elif code != 0:
            state, error = "failed", last_line(folder / "log.txt") or f"the training process exited with {code}"
        else:
            try:
                self.tenants.set_adapter(
                    tenant, folder / "run", activate=activate, record=lambda con, v: _ended(con, job_id, state, v)
                )
            except Exception as exc:  # any: a job whose adapter cannot be registered fails, it does not hang
                state, error = "failed", f"the adapter could not be registered: {exc}"
        if state != "succeeded":
            with service_db(self.jobs.root) as con:
                _ended(con, job_id, state, None, error)
        drop_checkpoints(folder)
        del self.handles[job_id], self.slots[job_id], self.exits[job_id]
        log.info("job %s of %s: %s%s", job_id, tenant, state, f" ({error})" if error else "")


def _ended(con: sqlite3.Connection, job_id: str, state: str, version: int | None, error: str | None = None) -> None:
    """A running job's end, in the caller's transaction; one that is no longer running (its tenant removed
    meanwhile) refuses a registration made for it."""
    done = con.execute(
        "UPDATE jobs SET state = ?, error = ?, version = ?, ended = ?, handle = NULL "
        "WHERE id = ? AND state = 'running'",
        (state, error, version, time.time(), job_id),
    ).rowcount
    if not done and version is not None:
        raise ValueError(f"job {job_id}: no longer running")
