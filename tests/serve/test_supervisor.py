"""The job supervisor against a tenant's cancel that lands while it starts the job, and a restarted
server taking over the jobs an earlier one left running on a cluster."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from serving import IdleRunner, tenant_root

import ppvit.serve.supervisor as supervisor_module
from ppvit.serve.jobs import Jobs, ServiceLimits, last_line
from ppvit.serve.limits import Limits
from ppvit.serve.runners import RayRunner
from ppvit.serve.service_db import service_db
from ppvit.serve.supervisor import Supervisor, remove_tenant
from ppvit.serve.tenants import TenantStore
from ppvit.serve.training_api import training_router
from ppvit.train.config import TrainConfig


class CancelledWhileStarting(IdleRunner):
    """The tenant's cancel (the API's own call) arrives while the job's process starts: after the supervisor
    read the job as queued, before it recorded it as running. A cancelled process exits at the next poll."""

    def __init__(self, jobs: Jobs, tenant_id: int) -> None:
        super().__init__()
        self.jobs, self.tenant_id, self.cancelled = jobs, tenant_id, []

    def start(self, job_id: str, config: Path, log_file: Path, devices: list[str], handle: str | None = None) -> str:
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
        self.down = False  # unreachable: every request a connection error

    def add(self, submission: str, job_id: str, status: str, start_time: int) -> None:
        self.jobs[submission] = {
            "type": "SUBMISSION",
            "submission_id": submission,
            "status": status,
            "start_time": start_time,
            "metadata": {"ppvit_job": job_id},
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path.removeprefix("/api/jobs/").strip("/")
        if request.method == "POST" and not path:
            body = json.loads(request.content)
            if body["submission_id"] in self.jobs:  # Ray's answer to an id it has
                return httpx.Response(400, text=f"Job with submission_id {body['submission_id']} already exists.")
            self.add(body["submission_id"], body["metadata"]["ppvit_job"], "PENDING", 10**6)
            self.jobs[body["submission_id"]]["metadata"] = body["metadata"]
            return httpx.Response(200, json={"submission_id": body["submission_id"]})
        if request.method == "GET" and not path:
            return httpx.Response(200, json=list(self.jobs.values()))
        submission, _, action = path.partition("/")
        if submission not in self.jobs:
            return httpx.Response(404, text=f"Job {submission} does not exist")  # Ray's words (2.60's job_head)
        if action == "stop":
            self.stopped.append(submission)
            self.jobs[submission]["status"] = "STOPPED"
        return httpx.Response(200, json=self.jobs[submission])


CASES = {  # name: (recorded handle, cancel asked, the cluster's submissions (id, status)) -> (state, adopted)
    "running on the cluster": (("ray:a", 0, [("a", "RUNNING")]), ("running", True)),
    "ended while the server was down": (("ray:a", 0, [("a", "SUCCEEDED")]), ("running", True)),
    # the server died after recording the submission id, before its POST: nothing to adopt, nothing orphaned
    "recorded, never submitted": (("ray:a", 0, []), ("queued", False)),
    "cancelled, never submitted": (("ray:a", 1, []), ("cancelled", False)),
    "a local process (died with its server)": (("local:1", 0, []), ("queued", False)),
    "a local process being started (none recorded)": ((None, 0, []), ("queued", False)),
}


@pytest.mark.parametrize("case", CASES)
def test_a_restarted_server_adopts_what_the_cluster_runs_and_queues_the_rest_once(tmp_path: Path, case: str) -> None:
    """CI's Ray test saw two submissions of one job: the server was killed between submitting it and recording its
    submission id, and the next one submitted it again beside the first (two trainings of one job folder). The id
    is now chosen and recorded with the job's claim, before the submission: a restarted server polls it, adopts
    what runs and queues (once) what never reached the cluster; a job cancelled meanwhile ends cancelled."""
    (handle, cancel, submissions), (state, adopted) = CASES[case]
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", handle, 1, "cpu")])
    with service_db(tmp_path) as con:
        con.execute("UPDATE jobs SET cancel = ?", (cancel,))
    cluster = FakeRay()
    for submission, status in submissions:
        cluster.add(submission, "A", status, 1)
    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.start()
    with service_db(tmp_path) as con:
        assert con.execute("SELECT state FROM jobs").fetchone()[0] == state
    assert supervisor.handles == ({"A": handle} if adopted else {})
    supervisor.step()  # a queued job started again: one submission, under the id recorded with its claim
    with service_db(tmp_path) as con:
        now, recorded = con.execute("SELECT state, handle FROM jobs").fetchone()
    if state == "queued":
        assert now == "running" and live(cluster, "A") == [recorded.removeprefix("ray:")]
    assert len(live(cluster, "A")) <= 1  # one training of the job, never two


def test_a_cluster_unreachable_when_the_server_starts_keeps_its_jobs(tmp_path: Path) -> None:
    """Jobs with their submission recorded are adopted while the cluster does not answer (polled later), not
    queued again (a second submission beside a live one) nor refused (the server, inference too, would not start)."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "ray:a", 1, "cpu")])
    cluster = FakeRay()
    cluster.add("a", "A", "RUNNING", 1)
    cluster.down = True
    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.start()
    assert supervisor.handles == {"A": "ray:a"}
    cluster.down = False
    cluster.jobs["a"]["status"] = "FAILED"
    supervisor.step()
    with service_db(tmp_path) as con:
        assert con.execute("SELECT state FROM jobs").fetchone()[0] == "failed"


def add_jobs(root: Path, tenant_id: int, rows: list[tuple[str, str, str | None, int, str | None]]) -> None:
    """Jobs as an earlier server left them: (id, state, handle, processes, devices)."""
    with service_db(root) as con:
        for i, (job_id, state, handle, processes, devices) in enumerate(rows):
            con.execute(
                "INSERT INTO jobs (id, tenant_id, dataset, state, config, activate, created, handle, processes, "
                "devices) VALUES (?, ?, 'toy', ?, ?, 0, ?, ?, ?, ?)",
                (job_id, tenant_id, state, yaml.safe_dump(TrainConfig().to_dict()), i, handle, processes, devices),
            )


def ray_supervisor(root: Path, cluster: FakeRay, devices: list[str], max_processes: int = 1) -> Supervisor:
    runner = RayRunner("http://ray")
    runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(cluster))
    limits = ServiceLimits(models={}, devices=devices, max_processes=max_processes)
    supervisor = Supervisor(Jobs(root, limits), TenantStore(root), runner)
    supervisor._thread = threading.Thread(target=lambda: None)  # start() without the polling thread
    return supervisor


def live(cluster: FakeRay, job_id: str) -> list[str]:
    return [
        s
        for s, j in cluster.jobs.items()
        if j["metadata"]["ppvit_job"] == job_id and j["status"] in ("PENDING", "RUNNING")
    ]


@pytest.mark.parametrize("devices", [["0", "1", "cpu"], ["0"]], ids=["same slots", "fewer slots"])
def test_a_restarted_server_adopts_every_live_job_on_the_slots_it_had(tmp_path: Path, devices: list[str]) -> None:
    """Placed afresh in the order they were created, A (2 processes) took 0,1, B the cpu slot and C none: C went back
    to the queue while its submission trained on, and the next free slot submitted it again (second reader). A
    running job now keeps the slots recorded when it was claimed; a restart with fewer slots runs them over."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "ray:a", 2, "cpu,cpu"), ("B", "running", "ray:b", 1, "0"),
                                   ("C", "running", "ray:c", 1, "1")])  # fmt: skip
    cluster = FakeRay()
    for submission, job_id in (("a", "A"), ("b", "B"), ("c", "C")):
        cluster.add(submission, job_id, "RUNNING", 1)
    supervisor = ray_supervisor(tmp_path, cluster, devices, max_processes=2)
    supervisor.start()
    assert supervisor.slots == {"A": ["cpu", "cpu"], "B": ["0"], "C": ["1"]}
    cluster.jobs["b"]["status"] = "FAILED"  # B ends: its slot is free
    supervisor.step()
    assert {job: live(cluster, job) for job in "ABC"} == {"A": ["a"], "B": [], "C": ["c"]}
    assert supervisor.slots == {"A": ["cpu", "cpu"], "C": ["1"]}


@pytest.mark.parametrize("taken", [True, False], ids=["taken, answer lost", "never reached"])
def test_a_submission_left_unanswered_is_polled_as_submitted(tmp_path: Path, taken: bool) -> None:
    """httpx's errors are neither OSError nor RuntimeError: a claimed job stayed 'running' with no process for the
    server's life (never polled, its cancel never acted on) and the rest of the step was abandoned (second reader).
    Now the submission's id is recorded before it is sent; unanswered, the next poll finds it on the cluster or
    sends it again under that id: the job runs once either way, and the step goes on to the next job."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "queued", None, 1, None), ("B", "queued", None, 1, None)])
    cluster, posts = FakeRay(), []

    def flaky(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/jobs/":
            posts.append(request)
            if len(posts) == 1:  # A's submission
                if taken:
                    cluster(request)
                    raise httpx.ReadTimeout("timed out", request=request)
                raise httpx.ConnectError("connection refused", request=request)
        return cluster(request)

    supervisor = ray_supervisor(tmp_path, cluster, ["0", "1"])
    supervisor.runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(flaky))
    supervisor.step()
    assert sorted(supervisor.handles) == ["A", "B"] and len(live(cluster, "B")) == 1
    supervisor.step()
    with service_db(tmp_path) as con:
        state, handle = con.execute("SELECT state, handle FROM jobs WHERE id = 'A'").fetchone()
    assert state == "running" and live(cluster, "A") == [handle.removeprefix("ray:")]  # sent again if need be
    assert sorted(supervisor.handles) == ["A", "B"]


def test_a_submission_the_cluster_takes_late_runs_once_and_is_watched(tmp_path: Path) -> None:
    """Ray saves a submission after its own waits: a POST that timed out here could be saved after the next poll
    answered 404, and the job was failed while the cluster ran it, unwatched (third reader). An unanswered
    submission is now sent again under the same id while the cluster does not know it; Ray's "already exists"
    for the id (the late one of our POSTs) is taken as submitted."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "queued", None, 1, None)])
    cluster, late = FakeRay(), []

    def slow(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/jobs/" and not late:
            late.append(request)  # inside Ray still: saved after the next poll's 404
            raise httpx.ReadTimeout("timed out", request=request)
        if request.method == "GET" and late and late[-1] is not None:
            answer = cluster(request)
            cluster(late.pop())  # saved now, after that 404
            late.append(None)
            return answer
        return cluster(request)

    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(slow))
    for _ in range(3):
        supervisor.step()
    with service_db(tmp_path) as con:
        state, handle = con.execute("SELECT state, handle FROM jobs").fetchone()
    assert state == "running" and live(cluster, "A") == [handle.removeprefix("ray:")]
    assert supervisor.handles == {"A": handle}
    cluster.jobs[handle.removeprefix("ray:")]["status"] = "FAILED"
    supervisor.step()
    with service_db(tmp_path) as con:
        assert con.execute("SELECT state FROM jobs").fetchone()[0] == "failed"


def test_a_server_killed_while_ray_takes_its_submission_is_not_run_twice(tmp_path: Path) -> None:
    """Killed while its POST was inside Ray: the next server polled the recorded id (404: not saved yet), queued
    the job and submitted it under a new id, then the first was saved: two trainings (third reader). The id of a
    start the cluster never showed is used again, so one of the two POSTs is refused as a duplicate."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "ray:ppvit-A-1", 1, "cpu")])
    cluster = FakeRay()
    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.start()  # 404: queued again, its id kept
    cluster.add("ppvit-A-1", "A", "PENDING", 1)  # the dead server's POST, saved now
    supervisor.step()
    with service_db(tmp_path) as con:
        assert con.execute("SELECT state, handle FROM jobs").fetchone() == ("running", "ray:ppvit-A-1")
    assert live(cluster, "A") == ["ppvit-A-1"] and supervisor.handles == {"A": "ray:ppvit-A-1"}


def job_state(root: Path, job_id: str = "A") -> str:
    with service_db(root) as con:
        return con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


@pytest.mark.parametrize("restarted", [False, True], ids=["while polling", "at a restart"])
def test_a_proxys_404_page_is_no_answer_not_a_job_gone(tmp_path: Path, restarted: bool) -> None:
    """A reverse proxy before the dashboard answering its own 404 page (a path it does not route yet, the dashboard
    behind it restarting): any 404 was taken for Ray's "no such job", so a job training on the cluster was taken
    for gone (a poll's -1: failed; a restarted server's: not adopted, queued and submitted again beside the one
    training). Only Ray's own 404 ("Job ... does not exist") says so now; another is no answer."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "ray:a", 1, "cpu")])
    cluster, posts, routed = FakeRay(), [], [not restarted]
    cluster.add("a", "A", "RUNNING", 1)

    def proxy(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posts.append(request)
        if routed:
            return cluster(request)
        return httpx.Response(
            404, text="<html><h1>404 Not Found</h1>nginx</html>", headers={"content-type": "text/html"}
        )

    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(proxy))
    supervisor.start()
    routed.clear()
    for _ in range(3):
        supervisor.step()
    assert job_state(tmp_path) == "running" and supervisor.handles == {"A": "ray:a"}
    assert posts == [] and live(cluster, "A") == ["a"]  # one training, still watched
    routed.append(True)
    cluster.jobs["a"]["status"] = "FAILED"
    supervisor.step()
    assert job_state(tmp_path) == "failed" and supervisor.slots == {}


@pytest.mark.parametrize("then", ["cancelled", "answered 500"])
def test_a_submission_saved_after_the_job_ended_here_does_not_run(tmp_path: Path, then: str) -> None:
    """A POST left inside Ray (unanswered here) and then a cancel, or a resend answered 500 ("no available agent"):
    the job ended here (cancelled, failed) and the first POST, saved afterwards, trained unwatched (fourth reader).
    A cancelled one's id is now taken by a job that does nothing; a 5xx is no answer (sent again)."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "queued", None, 1, None)])
    cluster, posts = FakeRay(), []

    def slow(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/jobs/":
            posts.append(request)
            if len(posts) == 1:  # inside Ray still
                raise httpx.ReadTimeout("timed out", request=request)
            if then == "answered 500" and len(posts) == 2:
                return httpx.Response(500, text="No available agent to submit job, please try again later.")
        return cluster(request)

    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(slow))
    supervisor.step()
    if then == "cancelled":
        Jobs(tmp_path, ServiceLimits(models={})).cancel(tenant_id, "A")
    for _ in range(2):
        supervisor.step()
    cluster(posts[0])  # the first POST, saved now (refused, where its id is taken)
    for _ in range(3):
        supervisor.step()
    submitted = json.loads(posts[0].content)["submission_id"]
    if then == "cancelled":
        assert job_state(tmp_path) == "cancelled" and live(cluster, "A") == []
        assert cluster.jobs[submitted]["metadata"].get("ppvit_cancelled") == "1"  # the placeholder holds the id
    else:
        assert job_state(tmp_path) == "running" and live(cluster, "A") == [submitted]  # one training, watched
        assert supervisor.handles == {"A": f"ray:{submitted}"} and supervisor.runner.unconfirmed == {}


@pytest.mark.parametrize("answer", ["a page not Ray's", "a gateway's 502", "unreachable", "404, a POST's 502"])
@pytest.mark.parametrize("had_it", [False, True], ids=["never received", "received, its answer lost"])
def test_a_submission_unconfirmed_past_the_deadline_is_given_up_not_taken_for_ended(
    tmp_path: Path, answer: str, had_it: bool
) -> None:
    """An address answering a sign-in page (a proxy) or a gateway's 502 to everything, or a cluster gone: the
    submission was sent again at every poll for the server's life, the job 'running' with no word why. Past
    ``confirm_s`` it is now given up (its log says so; what is sent again is a job that does nothing), yet the
    job ends only when the cluster answers: it may hold the real one, and one taken for ended trains unwatched
    (second reader)."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "queued", None, 1, None)])
    cluster, posts, broken = FakeRay(), [], [True]
    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.jobs.folder("A").mkdir(parents=True)

    def proxy(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/jobs/":
            posts.append(json.loads(request.content))
            if had_it and len(posts) == 1:
                cluster(request)  # Ray took it; its answer is lost
        if not broken:
            return cluster(request)
        if answer == "unreachable":
            raise httpx.ConnectError("connection refused", request=request)
        if answer == "a gateway's 502" or (answer == "404, a POST's 502" and request.method == "POST"):
            return httpx.Response(502, text="Bad Gateway")
        if answer == "404, a POST's 502":
            return httpx.Response(404, text=f"Job {request.url.path.rsplit('/', 1)[-1]} does not exist")
        return httpx.Response(200, text="<html>sign in</html>", headers={"content-type": "text/html"})

    supervisor.runner.http = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(proxy))
    supervisor.step()
    handle, submitted = supervisor.handles["A"], posts[0]["submission_id"]
    deadline, log_file = supervisor.runner.unconfirmed[handle].deadline
    supervisor.runner.unconfirmed[handle].deadline = (deadline - 601, log_file)  # ten minutes on
    sent = len(posts)
    for _ in range(2):
        supervisor.step()
    given_up = f"ppvit serve: the Ray cluster at http://ray did not confirm submission {submitted} in 600 s"
    assert job_state(tmp_path) == "running" and supervisor.slots == {"A": ["cpu"]}  # not taken for ended
    assert last_line(log_file).startswith(given_up) and supervisor.runner.unconfirmed[handle].deadline is None
    broken.clear()  # the cluster answers
    supervisor.step()
    assert (cluster.jobs[submitted]["metadata"].get("ppvit_cancelled") == "1") is not had_it
    assert all(p["entrypoint"] == "exit 143" for p in posts[sent:])  # given up: nothing sent again trains
    assert len(posts[sent:]) == (answer == "404, a POST's 502") * 2 + (not had_it)
    cluster.jobs[submitted]["status"] = "FAILED"  # the placeholder's exit 143 (or the real one's end)
    supervisor.step()
    with service_db(tmp_path) as con:
        state, error = con.execute("SELECT state, error FROM jobs").fetchone()
    assert state == "failed" and error.startswith(given_up) and supervisor.slots == {}


def staged_copy(self: TenantStore, name: str, adapter: Path, weights: object, max_classes: int) -> tuple[Path, None]:
    """TenantStore._stage without the model: the copy only (the registration's transaction is what is tested)."""
    staged = Path(tempfile.mkdtemp(prefix=".new.", dir=self.root))
    (staged / "adapter_model.safetensors").write_text(adapter.name)
    return staged, None


def versions(root: Path) -> tuple[list[int], int]:
    with service_db(root) as con:
        rows = [r[0] for r in con.execute("SELECT version FROM adapters ORDER BY version")]
        return rows, con.execute("SELECT version FROM tenants").fetchone()[0]


def test_a_jobs_adapter_and_its_success_are_written_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter's version was committed, then the job's 'succeeded' in a second transaction: a server killed in
    between adopted the finished job at its next start and registered (and activated) the adapter again (second
    reader). Killed now inside the one transaction, nothing is registered; the next server registers it once."""
    monkeypatch.setattr(TenantStore, "_stage", staged_copy)
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "ray:a", 1, "cpu")])
    with service_db(tmp_path) as con:
        con.execute("UPDATE jobs SET activate = 1")
    cluster = FakeRay()
    cluster.add("a", "A", "SUCCEEDED", 1)
    first = ray_supervisor(tmp_path, cluster, ["cpu"])
    first.start()
    killed = []

    def kill(con: object, job_id: str, state: str, version: int) -> None:  # the job's row next: the process dies
        killed.append(version)
        raise KeyboardInterrupt

    monkeypatch.setattr("ppvit.serve.supervisor._ended", kill)
    with pytest.raises(KeyboardInterrupt):
        first.step()
    assert killed == [2] and versions(tmp_path) == ([1], 1)  # nothing registered
    monkeypatch.undo()
    monkeypatch.setattr(TenantStore, "_stage", staged_copy)
    second = ray_supervisor(tmp_path, cluster, ["cpu"])
    second.start()
    second.step()
    second.step()
    with service_db(tmp_path) as con:
        assert con.execute("SELECT state, version, handle FROM jobs").fetchone() == ("succeeded", 2, None)
    assert versions(tmp_path) == ([1, 2], 2) and second.handles == {} and second.slots == {}
    third = ray_supervisor(tmp_path, cluster, ["cpu"])  # and once more: a finished job is not taken up again
    third.start()
    third.step()
    assert versions(tmp_path) == ([1, 2], 2)


def test_a_job_whose_adapter_cannot_be_registered_fails_and_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error of the registration (a RuntimeError of torch's while the adapter is checked, here) failed to reach
    the except, and the job, its slot already freed, stayed 'running' for good."""

    def broken(*args: object) -> None:
        raise RuntimeError("size mismatch for head.weight")

    monkeypatch.setattr(TenantStore, "_stage", broken)
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "ray:a", 1, "cpu")])
    cluster = FakeRay()
    cluster.add("a", "A", "SUCCEEDED", 1)
    supervisor = ray_supervisor(tmp_path, cluster, ["cpu"])
    supervisor.start()
    supervisor.step()
    with service_db(tmp_path) as con:
        row = con.execute("SELECT state, error FROM jobs").fetchone()
    assert row == ("failed", "the adapter could not be registered: size mismatch for head.weight")
    assert supervisor.handles == {} and versions(tmp_path) == ([1], 1)


def test_a_job_with_no_process_recorded_is_waited_for_then_taken_as_gone(tmp_path: Path) -> None:
    """A running job with no process recorded was taken for dead at once, its folder deleted while a server was
    starting its process (second reader). It is waited for now; one still without a process after ``wait_s`` is a
    local one whose server died while starting it (a cluster's submission is recorded before it is sent)."""
    tenant_id, token = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", None, 1, "cpu")])
    (tmp_path / "jobs" / "A").mkdir(parents=True)
    recorded = threading.Timer(0.3, lambda: add_jobs(tmp_path, tenant_id, [("B", "queued", None, 1, None)]))
    recorded.start()  # meanwhile, a job submitted by a request let in before the token was revoked
    t0 = time.monotonic()
    remove_tenant(tmp_path, "eve", wait_s=1.0)
    assert time.monotonic() - t0 >= 1.0  # waited
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())
    assert TenantStore(tmp_path).list() == [] and TenantStore(tmp_path).by_token(token) is None


def test_a_job_cancelled_before_its_server_died_is_not_started_again(tmp_path: Path) -> None:
    """A running job asked to cancel (by its tenant, or by remove-tenant) whose server died before it stopped was
    queued again with its cancel flag and started by the next claim (second reader): it ends cancelled now."""
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", "local:1", 1, "cpu")])
    with service_db(tmp_path) as con:
        con.execute("UPDATE jobs SET cancel = 1")
    started = []

    class Recording(IdleRunner):
        def start(
            self, job_id: str, config: Path, log_file: Path, devices: list[str], handle: str | None = None
        ) -> str:
            started.append(job_id)
            return super().start(job_id, config, log_file, devices)

    supervisor = Supervisor(Jobs(tmp_path, ServiceLimits(models={})), TenantStore(tmp_path), Recording())
    supervisor._thread = threading.Thread(target=lambda: None)
    supervisor.start()
    supervisor.step()
    with service_db(tmp_path) as con:
        assert con.execute("SELECT state FROM jobs").fetchone()[0] == "cancelled"
    assert started == []


def test_a_finish_written_at_the_second_try_keeps_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local runner says a process's exit code once: a job whose end could not be written (a locked database)
    was failed at the next step with "the training process exited with -1" (second reader). The code is kept."""

    def broken(*args: object) -> None:
        raise RuntimeError("size mismatch for head.weight")

    monkeypatch.setattr(TenantStore, "_stage", broken)
    tenant_id, _ = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "running", None, 1, "cpu")])
    codes = [0]

    class ExitsOnce(IdleRunner):
        def poll(self, handle: str) -> int | None:
            return codes.pop() if codes else -1

    supervisor = Supervisor(Jobs(tmp_path, ServiceLimits(models={})), TenantStore(tmp_path), ExitsOnce())
    supervisor.handles, supervisor.slots = {"A": "idle:A"}, {"A": ["cpu"]}
    locked = [sqlite3.OperationalError("database is locked")]
    real = supervisor_module._ended

    def once_locked(*args: object) -> None:
        if locked:
            raise locked.pop()
        real(*args)

    monkeypatch.setattr(supervisor_module, "_ended", once_locked)
    with pytest.raises(ValueError, match="database is locked"):  # logged by the supervisor's thread
        supervisor.step()
    supervisor.step()
    with service_db(tmp_path) as con:
        row = con.execute("SELECT state, error FROM jobs").fetchone()
    assert row == ("failed", "the adapter could not be registered: size mismatch for head.weight")
    assert supervisor.handles == supervisor.slots == supervisor.exits == {}


def test_a_removal_cut_short_is_finished_by_running_it_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows went first, then the files: a removal interrupted while deleting a large dataset left its files, and
    the next `remove-tenant` answered "no tenant eve". Now the rows go last."""
    tenant_id, token = tenant_root(tmp_path)
    add_jobs(tmp_path, tenant_id, [("A", "succeeded", None, 1, None)])
    shard = tmp_path / "datasets" / str(tenant_id) / "d" / "train" / "shard-000000.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"ciphertext")
    (tmp_path / "jobs" / "A" / "run").mkdir(parents=True)
    rmtree = shutil.rmtree

    def interrupted(path: Path, *args: object, **kwargs: object) -> None:
        if "datasets" in str(path):
            raise KeyboardInterrupt  # Ctrl-C while a large dataset is deleted
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr("ppvit.serve.supervisor.shutil.rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        remove_tenant(tmp_path, "eve", wait_s=1)
    assert TenantStore(tmp_path).by_token(token) is None  # not served meanwhile
    monkeypatch.undo()
    remove_tenant(tmp_path, "eve", wait_s=1)
    left = [p for p in tmp_path.rglob("*") if p.is_file() and "sqlite" not in p.name]
    assert left == [] and TenantStore(tmp_path).list() == []
    with pytest.raises(ValueError, match=r"^no tenant eve$"):
        remove_tenant(tmp_path, "eve", wait_s=1)


def test_a_second_server_with_training_on_one_folder_is_refused(tmp_path: Path) -> None:
    """Two servers with training on over one folder: each took the other's running jobs for a dead server's,
    queued them again and started them beside themselves (third reader). The second is refused in one line."""
    tenant_root(tmp_path)
    limits = ServiceLimits(models={})

    async def two() -> None:
        _, first = training_router(tmp_path, TenantStore(tmp_path), limits, Limits(256 << 20, 1, 32 << 20), 5.0)
        async with first(None):
            arriving = tmp_path / "datasets" / "1" / "d" / "train" / ".shard-000000.tar.5dko7_sb.tmp"
            arriving.parent.mkdir(parents=True)
            arriving.write_bytes(b"half a shard")  # the first server's upload in flight
            _, second = training_router(tmp_path, TenantStore(tmp_path), limits, Limits(256 << 20, 1, 32 << 20), 5.0)
            with pytest.raises(ValueError, match=rf"another ppvit serve \(pid {os.getpid()}\) runs the training"):
                async with second(None):
                    pass
            assert arriving.exists()  # the refused server swept nothing (reader: it deleted it)
        async with second(None):  # the first gone, the folder is the second's
            pass

    asyncio.run(two())
