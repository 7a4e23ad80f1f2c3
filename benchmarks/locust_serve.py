"""The locustfile of ``bench_serve_load.py``: tenants posting ciphertext to ``ppvit serve`` (no torch here).

``PPVIT_LOAD_CONFIG`` names a JSON file: ``tokens`` and ``bodies`` (a ``.npy`` request body file)
per role, and ``users`` per role. Roles: ``tenant`` (users spread over its tokens), ``victim``
(a tenant sending one image a request), ``noisy`` (one tenant sending many images a request) and
``labels`` (a tenant of many long class names alternating ``GET /v1/adapter`` and one-image requests).
Every request is named by its role, so the CSV has one row per role.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from locust import FastHttpUser, constant, task

CONFIG = json.loads(Path(os.environ["PPVIT_LOAD_CONFIG"]).read_text())


class _Role(FastHttpUser):
    abstract = True
    wait_time = constant(0)
    role = ""

    def on_start(self) -> None:
        tokens = CONFIG["tokens"][self.role]
        token = tokens[next(self.counter) % len(tokens)]
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"}
        self.body = Path(CONFIG["bodies"][self.role]).read_bytes()

    @task
    def predict(self) -> None:
        self.client.post("/v1/predict", data=self.body, headers=self.headers, name=self.role)


class TenantUser(_Role):
    role = "tenant"
    counter = itertools.count()
    fixed_count = CONFIG["users"].get("tenant", 0)


class VictimUser(_Role):
    role = "victim"
    counter = itertools.count()
    fixed_count = CONFIG["users"].get("victim", 0)


class NoisyUser(_Role):
    role = "noisy"
    counter = itertools.count()
    fixed_count = CONFIG["users"].get("noisy", 0)


class LabelsUser(_Role):
    role = "labels"
    counter = itertools.count()
    fixed_count = CONFIG["users"].get("labels", 0)

    @task
    def adapter(self) -> None:
        self.client.get("/v1/adapter", headers=self.headers, name=self.role)
