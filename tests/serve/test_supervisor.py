"""The job supervisor against a tenant's cancel that lands while it starts the job."""

from __future__ import annotations

from pathlib import Path

import yaml
from serving import IdleRunner, tenant_root

from ppvit.serve.datasets import service_db
from ppvit.serve.jobs import Jobs, ServiceLimits
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
