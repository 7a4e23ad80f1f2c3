"""Where a service job's processes run: on this machine (:class:`LocalRunner`) or on a Ray cluster
(:class:`RayRunner`). Both run the same ``ppvit train --config JOB.yaml --resume`` (:func:`train_command`);
:class:`ppvit.serve.supervisor.Supervisor` decides when, a runner only starts, polls, adopts and stops."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

RAY_EXIT = {"PENDING": None, "RUNNING": None, "SUCCEEDED": 0, "FAILED": 1, "STOPPED": 143}  # Ray status: exit code


class Runner(Protocol):
    """Where job processes run. ``start`` runs one process per entry of ``devices`` (all "cpu", or
    CUDA indices) and returns a handle; ``poll`` the exit code (None: running); ``adopt`` takes
    over a handle of an earlier server (False: its process is gone, start again).

    ``plan`` names the handle a start will have where the runner can before starting (a cluster's
    submission id): the supervisor records it with the job's claim, so a server that dies while starting
    the job leaves the next one a handle to poll, never a job running where nobody looks. None: the
    handle is known once started (a local process dies with the server anyway). ``previous``: the handle
    recorded for the job's last start, which never reached the runner (a restarted server found nothing)."""

    def plan(self, job_id: str, previous: str | None = None) -> str | None: ...

    def start(self, job_id: str, config: Path, log_file: Path, devices: list[str], handle: str | None) -> str: ...

    def poll(self, handle: str) -> int | None: ...

    def adopt(self, handle: str) -> bool: ...

    def cancel(self, handle: str) -> None: ...

    def shutdown(self) -> None: ...

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) when a job's process ends; a runner that cannot tell
        does nothing, and the supervisor notices at its next poll."""


def die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it dies (Linux); elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def train_command(python: str, config: Path, processes: int) -> list[str]:
    """The job's ``ppvit train``; several processes under torchrun, each through :mod:`ppvit.serve.worker`
    (torchrun's workers would not die with a killed launcher: PR_SET_PDEATHSIG is not inherited)."""
    train = ["train", "--config", str(config), "--resume"]
    if processes == 1:
        return [python, "-m", "ppvit.cli", *train]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return [python, *launch, "-m", "ppvit.serve.worker", *train]


class LocalRunner:
    """``ppvit train`` processes on this machine (the embedded runner); call from one long-lived thread.

    ``preexec``: also run in each started process before it executes (a resource limit, in tests).
    """

    def __init__(self, preexec: Callable[[], None] | None = None) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.preexec = preexec
        self.exited: Callable[[], None] | None = None

    def on_exit(self, callback: Callable[[], None]) -> None:
        self.exited = callback

    def _child_setup(self) -> None:
        die_with_parent()
        os.umask(0o077)  # the run folder is the tenant's: private, as the rest of the store
        if self.preexec is not None:
            self.preexec()

    def plan(self, job_id: str, previous: str | None = None) -> None:
        return None  # its pid, once started

    def start(self, job_id: str, config: Path, log_file: Path, devices: list[str], handle: str | None = None) -> str:
        env = dict(os.environ)
        if devices[0] != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)  # torchrun's ranks take cuda:0.. of these
        cmd = train_command(sys.executable, config, len(devices))
        with open(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as fh:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=self._child_setup,
            )
        handle = f"local:{proc.pid}"
        self.procs[handle] = proc
        if self.exited is not None:  # the job ends when its process does, not at the next poll
            threading.Thread(target=lambda: (proc.wait(), self.exited()), daemon=True).start()
        return handle

    def poll(self, handle: str) -> int | None:
        proc = self.procs.get(handle)
        if proc is None:
            return -1  # not ours: a process of an earlier server
        code = proc.poll()
        if code is not None:
            del self.procs[handle]
        return code

    def adopt(self, handle: str) -> bool:
        return False  # an earlier server's processes died with it (PR_SET_PDEATHSIG)

    def cancel(self, handle: str) -> None:
        proc = self.procs.get(handle)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # training checkpoints and stops at its next step

    def shutdown(self) -> None:
        """Stop every process (checkpointed: the next server resumes them)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


class RayRunner:
    """Jobs submitted to a Ray cluster through its job submission REST API (the dashboard's ``/api/jobs/``).

    The entrypoint is the same ``ppvit train --config JOB.yaml --resume``, run by Ray on a node
    with ppvit installed at the same ``python`` path and the server root on a shared file
    system (the job's folder holds its config, checkpoints, log and adapter). Ray schedules;
    ppvit only submits, polls and stops. Jobs keep running while the server is down: a new
    server adopts them by their submission id.
    """

    def __init__(
        self, address: str, python: str = sys.executable, timeout: float = 30.0, confirm_s: float = 600.0
    ) -> None:
        import httpx

        self.http = httpx.Client(base_url=address.rstrip("/"), timeout=timeout)
        self.address, self.python, self.confirm_s = address, python, confirm_s
        self.unconfirmed: dict[str, Unconfirmed] = {}  # handle -> its submission, sent but not answered yet

    def plan(self, job_id: str, previous: str | None = None) -> str:
        """A new submission id for each start of a job (a resumed job is a new submission), except that the id of
        a start that never reached the cluster is used again: its submission, were it to arrive late, is then
        refused by Ray as a duplicate instead of running beside the new one."""
        if previous is not None and previous.startswith("ray:"):
            return previous
        return f"ray:ppvit-{job_id}-{secrets.token_hex(4)}"

    def start(self, job_id: str, config: Path, log_file: Path, devices: list[str], handle: str | None = None) -> str:
        """Submit the job as ``handle`` (from :meth:`plan`). A submission left unanswered (the cluster
        unreachable, an answer lost) is not an error: it is sent again, under the same id, while the
        cluster does not know it, and taken as submitted when Ray says the id exists."""
        handle = handle or self.plan(job_id)
        cmd = train_command(self.python, config, len(devices))
        entrypoint = f"umask 077; {shlex.join(cmd)} >> {shlex.quote(str(log_file))} 2>&1"
        body = {
            "entrypoint": entrypoint,
            "submission_id": handle.removeprefix("ray:"),
            "metadata": {"ppvit_job": job_id},
        }
        if devices[0] != "cpu":
            body["entrypoint_num_gpus"] = len(devices)  # Ray picks them and sets CUDA_VISIBLE_DEVICES
        refused = self._submit(handle, body)
        if refused:
            raise RuntimeError(f"Ray refused job {job_id}: {refused}")
        if handle in self.unconfirmed:
            self.unconfirmed[handle].deadline = (time.monotonic() + self.confirm_s, log_file)
        return handle

    def _submit(self, handle: str, body: dict) -> str | None:
        """POST a submission: None when taken (answered with its id, or Ray has it from an earlier POST of ours:
        "already exists") or not answered (a timeout, a 5xx, a page not Ray's: kept, sent again at the next poll
        that finds nothing under the id); else why Ray refused it."""
        sid = body["submission_id"]
        try:
            response = self.http.post("/api/jobs/", json=body)
            answered = response.status_code < 500 and (
                response.status_code != 200 or response.json().get("submission_id") == sid
            )
        except Exception as exc:
            response, answered = exc, False
        if not answered:
            log.warning(
                "Ray job %s: its submission was not answered (%s); sent again at the next poll", handle, response
            )
            self.unconfirmed.setdefault(handle, Unconfirmed(body)).body = body
            return None
        self.unconfirmed.pop(handle, None)
        if response.status_code == 200 or "already exists" in response.text:
            return None
        return f"{response.status_code} {response.text[:200]}"

    def poll(self, handle: str) -> int | None:
        try:
            response = self.http.get(f"/api/jobs/{handle.removeprefix('ray:')}")
            status = response.json()["status"] if response.status_code == 200 else None
        except Exception as exc:  # the cluster unreachable for a moment, a page not Ray's: running, as far as we know
            log.warning("Ray job %s: %s", handle, exc)
            self._overdue(handle, str(exc))
            return None
        if response.status_code == 404 and "does not exist" in response.text:  # Ray's own 404, not a proxy's
            if handle in self.unconfirmed:  # not (yet) taken: sent again, same id (the placeholder, once given up)
                self._overdue(handle, "404 for it, its submission not answered")
                return -1 if self._submit(handle, self.unconfirmed[handle].body) else None
            return -1
        if response.status_code != 200:  # a gateway's 502 for a dashboard gone, a proxy's 404 page: no answer
            self._overdue(handle, f"{response.status_code} {response.text[:100]}")
            return None
        self.unconfirmed.pop(handle, None)
        return RAY_EXIT.get(status)

    def _overdue(self, handle: str, answer: str) -> None:
        """A submission unconfirmed past ``confirm_s`` (an address that answers a sign-in page to everything, a
        cluster gone) is given up: from then on it is sent again as a job that does nothing, and its log says why.
        The job ends when the cluster answers: failed, once that placeholder has run; as the real one ends, where
        the cluster had it all along (watched, not stopped). Never before: an answer lost is no proof that nothing
        runs, and a job taken for ended would then train where nobody looks."""
        record = self.unconfirmed.get(handle)
        if record is None or record.deadline is None or time.monotonic() < record.deadline[0]:
            return
        log_file = record.deadline[1]
        record.body, record.deadline = _placeholder(record.body), None
        with contextlib.suppress(OSError), open(log_file, "a") as fh:
            fh.write(
                f"ppvit serve: the Ray cluster at {self.address} did not confirm submission "
                f"{handle.removeprefix('ray:')} in {self.confirm_s:g} s (its last answer: {answer[:200]}): given "
                "up, the job ends when the cluster answers\n"
            )

    def adopt(self, handle: str) -> bool:
        return handle.startswith("ray:") and self.poll(handle) != -1  # unreachable: running, as far as we know

    def cancel(self, handle: str) -> None:
        """Stop the job; one whose submission was not answered is sent again as a job that does nothing (its id
        taken: a late POST of the real one is then refused, or, landed first, refuses this one and is stopped)."""
        record = self.unconfirmed.get(handle)
        if record is not None:
            record.body = _placeholder(record.body)
        try:
            self.http.post(f"/api/jobs/{handle.removeprefix('ray:')}/stop")
        except Exception as exc:  # asked again at the next step while the job's cancel stands
            log.warning("Ray job %s: stop: %s", handle, exc)

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Ray's jobs end on the cluster: the supervisor's poll notices."""

    def shutdown(self) -> None:
        self.http.close()  # the cluster's jobs go on; the next server adopts them


@dataclass
class Unconfirmed:
    """A submission sent but not answered: ``body`` is sent again while the cluster does not know its id;
    ``deadline`` (the monotonic time past which it is given up, and the job's log that says so) is set by the start
    that sent it, and cleared once given up."""

    body: dict
    deadline: tuple[float, Path] | None = None


def _placeholder(body: dict) -> dict:
    """A submission under ``body``'s id that does nothing: a late POST of the real one is refused as a duplicate."""
    return {
        "entrypoint": "exit 143",
        "submission_id": body["submission_id"],
        "metadata": {**body["metadata"], "ppvit_cancelled": "1"},
    }
