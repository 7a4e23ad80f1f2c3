"""The job supervisor against a tenant's cancel that lands while it starts the job, and a restarted
server taking over the jobs an earlier one left running on a cluster."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from serving import IdleRunner, tenant_root

from ppvit.serve.datasets import service_db
from ppvit.serve.jobs import Jobs, ServiceLimits
from ppvit.serve.runners import RayRunner
from ppvit.serve.supervisor import Supervisor
from ppvit.serve.tenants import TenantStore
from ppvit.train.config import TrainConfig


class CancelledWhileStarting(IdleRunner):
    """The tenant's cancel (the API's own call) arrives while the job's process starts: after the supervisor
    read the job as queued, before it recorded it as running. A cancelled process exits at the next poll."""

    def __init__(self, jobs: Jobs, tenant_id: int) -> None:
        super().__init__()
        self.jobs, self.tenant_id, self.cancelled = jobs, tenant_id, []

    def start(self, job_id: str, config: Path, log_file: Path, devices: list[str]) -> str:
        self.jobs.cancel(self.tenant_id, job_id)
        return super().start(job_id, config, log_file, devices)

    def cancel(self, handle: str) -> None:
        self.cancelled.append(handle)

    def poll(self, handle: str) -> int | None:
        return -9 if handle in self.cancelled else None


def test_a_job_cancelled_while_it_starts_is_stopped_and_stays_cancelled(tmp_path: Path) -> None:
    """The launch wrote 'running' over the cancel's 'cancelled', so the job trained to the end (seen when a
    test cancelled a job at once). Now a job is claimed before its process starts: a cancel after that asks
    the running process to stop."""
    tenant_id, _ = tenant_root(tmp_path)
    jobs = Jobs(tmp_path, ServiceLimits(models={}))
    with service_db(tmp_path) as con:
        con.execute(
            "INSERT INTO jobs (id, tenant_id, dataset, state, config, activate, created) "
            "VALUES ('job-1', ?, 'toy', 'queued', ?, 0, 0)",
            (tenant_id, yaml.safe_dump(TrainConfig().to_dict())),
        )
    runner = CancelledWhileStarting(jobs, tenant_id)
    supervisor = Supervisor(jobs, TenantStore(tmp_path), runner)
    for _ in range(3):
        supervisor.step()
    assert runner.cancelled == ["idle:job-1"]
    assert jobs.get(tenant_id, "job-1")["state"] == "cancelled"
    assert supervisor.handles == {} and supervisor.slots == {}  # its slot is free again


class FakeRay:
    """Ray's job submission REST API as the runner uses it (submit, list, get, stop), held in a dict."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.stopped: list[str] = []

    def add(self, submission: str, job_id: str, status: str, start_time: int) -> None:
        self.jobs[submission] = {
            "type": "SUBMISSION",
            "submission_id": submission,
            "status": status,
            "start_time": start_time,
            "metadata": {"ppvit_job": job_id},
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/jobs/").strip("/")
        if request.method == "POST" and not path:
            body = json.loads(request.content)
            self.add(body["submission_id"], body["metadata"]["ppvit_job"], "PENDING", 10**6)
            return httpx.Response(200, json={"submission_id": body["submission_id"]})
        if request.method == "GET" and not path:
            return httpx.Response(200, json=list(self.jobs.values()))
        submission, _, action = path.partition("/")
        if submission not in self.jobs:
            return httpx.Response(404, json={})
        if action == "stop":
            self.stopped.append(submission)
            self.jobs[submission]["status"] = "STOPPED"
        return httpx.Response(200, json=self.jobs[submission])


def running_job(root: Path, handle: str | None) -> Jobs:
    """A job an earlier server claimed ('running') with ``handle`` recorded, or none: it died in between."""
    tenant_id, _ = tenant_root(root)
    with service_db(root) as con:
        con.execute(
            "INSERT INTO jobs (id, tenant_id, dataset, state, config, activate, created, handle) "
            "VALUES ('job-1', ?, 'toy', 'running', ?, 0, 0, ?)",
            (tenant_id, yaml.safe_dump(TrainConfig().to_dict()), handle),
        )
    return Jobs(root, ServiceLimits(models={}))


def handle_of(root: Path) -> tuple[str, str | None]:
    with service_db(root) as con:
        return con.execute("SELECT state, handle FROM jobs WHERE id = 'job-1'").fetchone()


CASES = {  # name: (recorded handle, the cluster's submissions (id, job, status, start), adopted, stopped)
    "recorded and running": ("ray:a", [("a", "job-1", "RUNNING", 1)], "ray:a", []),
    "recorded, gone from the cluster": ("ray:a", [], None, []),
    # the server died after submitting, before recording: the submission found by the job's id
    "unrecorded, running": (None, [("a", "job-1", "RUNNING", 1), ("b", "job-2", "RUNNING", 2)], "ray:a", []),
    "unrecorded, two live: the newest": (
        None,
        [("a", "job-1", "RUNNING", 1), ("b", "job-1", "PENDING", 2)],
        "ray:b",
        ["a"],
    ),
    "unrecorded, only ended ones": (None, [("a", "job-1", "SUCCEEDED", 1), ("b", "job-1", "FAILED", 2)], None, []),
    "unrecorded, never submitted": (None, [], None, []),
}


@pytest.mark.parametrize("case", CASES)
def test_a_restarted_server_adopts_the_job_it_submitted_whether_or_not_it_recorded_it(
    tmp_path: Path, case: str
) -> None:
    """CI's Ray test saw two submissions of one job: the server was killed between submitting a job and
    recording its submission id, and the next one submitted it again beside the first (two trainings of
    one job folder). A job left without a handle is now looked up on the cluster by its id."""
    recorded, submissions, adopted, stopped = CASES[case]
    jobs = running_job(tmp_path, recorded)
    cluster = FakeRay()
    for submission in submissions:
        cluster.add(*submission)
    runner = RayRunner("http://ray")
    runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(cluster))
    supervisor = Supervisor(jobs, TenantStore(tmp_path), runner)
    supervisor._thread = threading.Thread(target=lambda: None)  # its start without the polling thread
    supervisor.start()
    assert cluster.stopped == stopped
    if adopted is not None:
        assert handle_of(tmp_path) == ("running", adopted) and supervisor.handles == {"job-1": adopted}
    else:
        assert handle_of(tmp_path) == ("queued", None) and supervisor.handles == {}
        supervisor.step()  # started again: one new submission, recorded
        state, handle = handle_of(tmp_path)
        assert (
            state == "running" and handle.startswith("ray:ppvit-job-1-") and handle.removeprefix("ray:") in cluster.jobs
        )
    live = [
        s
        for s, j in cluster.jobs.items()
        if j["metadata"]["ppvit_job"] == "job-1" and j["status"] in ("PENDING", "RUNNING")
    ]
    assert len(live) == 1, live  # one training of the job, never two


def test_a_server_whose_cluster_does_not_answer_does_not_start_its_unrecorded_jobs_again(tmp_path: Path) -> None:
    jobs = running_job(tmp_path, None)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    runner = RayRunner("http://ray:8265")
    runner.http = httpx.Client(base_url="http://ray:8265", transport=httpx.MockTransport(down))
    supervisor = Supervisor(jobs, TenantStore(tmp_path), runner)
    with pytest.raises(RuntimeError, match=r"^Ray at http://ray:8265 did not list its jobs: connection refused$"):
        supervisor.start()
    assert handle_of(tmp_path) == ("running", None)
