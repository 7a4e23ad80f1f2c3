"""The cluster runner: jobs of the service submitted to a local Ray head node (Ray's job submission API).

Needs Ray's ``ray`` command (``pip install 'ray[default]'``; ``PPVIT_RAY`` names it if it is not
on PATH), in any environment: ppvit talks to the head over HTTP and needs no Ray package.
Slow (a head node takes half a minute to start on a small machine): ``make test-slow``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import SMALL, adapter_tensors, free_port, train_config
from safetensors.torch import save_file
from test_service import SETTINGS, ServerProcess, _wait

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.models.backbones import create_backbone
from ppvit.serve.client import Client
from ppvit.serve.tenants import TenantStore
from ppvit.train.loop import train

RAY = os.environ.get("PPVIT_RAY") or shutil.which("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="Ray's `ray` command is not installed")]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head node on free ports, in its own process group (ended as a group: nobody else's Ray touched)."""
    tmp = tmp_path_factory.mktemp("ray")
    port, dashboard = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2"]
    cmd += ["--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={tmp}"]
    with open(tmp / "ray.log", "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, (tmp / "ray.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start"
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_a_job_runs_on_the_cluster_and_a_restarted_server_adopts_it(
    ray_head: str, tmp_path: Path, toy_dataset: Path
) -> None:
    weights = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone(SMALL, num_classes=4).state_dict(), str(weights))
    key = tmp_path / "alice.key"
    Key.generate().save(key)
    train(train_config(tmp_path / "first", toy_dataset, key, weights=str(weights), epochs=1, block_size=4))
    token = TenantStore(tmp_path / "root").add("alice", tmp_path / "first")
    shards = tmp_path / "shards"
    encrypt_collection(toy_dataset, shards, BlockCipher(Key.load(key), "shuffle", 4), 32, "wds", progress=False)
    server = ServerProcess(tmp_path / "root", weights, tmp_path / "server.log", "--ray-address", ray_head).start()
    try:
        with Client(server.url, token) as c:
            c.upload(shards, "toy")
            job_id = c.submit("toy", {**SETTINGS, "epochs": 3})["id"]
            _wait(c, job_id, lambda j: j["state"] == "running", timeout=120)
        server.kill()  # the cluster's job goes on without the server
        server.start()
        with Client(server.url, token) as c:
            job = _wait(c, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=300)
            assert job["state"] == "succeeded", job
            assert (job["epoch"], job["version"]) == (3, 2)
            assert c.activate(job_id)["version"] == 2 and c.info()["version"] == 2
    finally:
        server.stop()
    submissions = [
        j for j in httpx.get(f"{ray_head}/api/jobs/").json() if (j.get("metadata") or {}).get("ppvit_job") == job_id
    ]
    assert len(submissions) == 1, "the restarted server submitted the job again instead of adopting it"
    assert submissions[0]["status"] == "SUCCEEDED"
    assert adapter_tensors(tmp_path / "root" / "jobs" / job_id / "run")
