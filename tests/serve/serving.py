"""Shared by the serve tests: four trained tenants (built once per session), a live server, references.

Four tenants trained here on the toy dataset from one base weights file: ``alice`` (lora-pe,
shuffle, key A), ``bob`` (melo, shuffle, key B), ``carol`` (linear, plain images) and
``dave`` (the key holder's lora-pe with --key-init under shuffle+scramble: own position
embeddings).
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from conftest import SMALL, free_port, train_config
from PIL import Image
from safetensors.torch import save_file

from ppvit.crypto.keys import Key
from ppvit.data.datasets import load_source_split
from ppvit.models.adapters import load_adapter
from ppvit.models.backbones import create_backbone
from ppvit.serve.app import ServeConfig
from ppvit.serve.jobs import ServiceLimits
from ppvit.serve.runners import LocalRunner
from ppvit.serve.server import uvicorn_config
from ppvit.serve.tenants import TenantStore, hash_token, new_token
from ppvit.train.inference import adapter_pipeline
from ppvit.train.loop import train

TENANTS = {  # name: (method, scheme, key name, extra settings)
    "alice": ("lora-pe", "shuffle", "A", {}),
    "bob": ("melo", "shuffle", "B", {"rank": 2, "alpha": 4.0}),
    "carol": ("linear", "none", None, {}),
    "dave": ("lora-pe", "shuffle+scramble", "A", {"key_init": True}),
}
_WORLD: dict = {}


def build_world(tmp: Path, toy_dataset: Path) -> dict:
    """Base weights, two keys, four trained runs and a server root with the four tenants (once per session)."""
    if _WORLD:
        return _WORLD
    weights = tmp / "base.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone(SMALL, num_classes=4).state_dict(), str(weights))
    keys = {}
    for i, name in enumerate(("A", "B")):  # fixed keys: a misrouted tenant's accuracy depends on the pair
        keys[name] = tmp / f"{name}.key"
        Key(bytes(range(32 * i, 32 * i + 32))).save(keys[name])
    runs, tokens = {}, {}
    store = TenantStore(tmp / "root")
    for tenant, (method, scheme, key, extra) in TENANTS.items():
        runs[tenant] = tmp / tenant
        cfg = train_config(
            runs[tenant],
            toy_dataset,
            keys[key] if key else None,
            method=method,
            scheme=scheme,
            weights=str(weights),
            epochs=2,
            **extra,
        )
        train(cfg)
        tokens[tenant] = store.add(tenant, runs[tenant])  # the weights file comes from the run's config.yaml
    test = load_source_split(toy_dataset, "test")
    _WORLD.update(
        tmp=tmp,
        weights=weights,
        keys=keys,
        runs=runs,
        tokens=tokens,
        root=tmp / "root",
        images=test.images,
        labels=test.labels,
    )
    return _WORLD


class LiveServer:
    """uvicorn serving ``create_app(cfg)`` in a thread on a free port, with ``ppvit serve``'s settings
    (``wrap``: an ASGI middleware around the app, to watch what the server receives)."""

    def __init__(self, cfg: ServeConfig, wrap: Callable[[Any], Any] | None = None, **ssl: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(cfg, "127.0.0.1", self.port, **ssl)
        if wrap is not None:
            config.app = wrap(config.app)
        config.timeout_graceful_shutdown = 10
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def key_of(world: dict, tenant: str) -> Key | None:
    name = TENANTS[tenant][2]
    return Key.load(world["keys"][name]) if name else None


def reference_logits(world: dict, tenant: str, images: np.ndarray, weights: Path | None = None) -> torch.Tensor:
    """What the adapter's own model (``ppvit predict``'s) computes on these plain images, encrypted with the key."""
    model, meta = load_adapter(world["runs"][tenant] / "adapter", weights or world["weights"])
    pipeline = adapter_pipeline(meta, model, key_of(world, tenant), data_encrypted=False)
    with torch.no_grad():
        return model.eval()(pipeline(torch.from_numpy(images), train=False))


EVERY_CLASS = 20  # top_k that names every class of these heads (the server's max_top_k by default)


def dense(top: list, what: str = "probability") -> list[float]:
    """An answer's ranked classes (``Ranked`` or the JSON dicts), asked with ``top_k=EVERY_CLASS``, as one
    value per class index: what a reference model's output is compared with."""
    values = {
        (r["index"] if isinstance(r, dict) else r.index): (r[what] if isinstance(r, dict) else getattr(r, what))
        for r in top
    }
    assert sorted(values) == list(range(len(values))), "the answer does not name every class"
    return [values[i] for i in range(len(values))]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def tenant_root(root: Path, name: str = "eve") -> tuple[int, str]:
    """A store with one tenant (id, token): its rows only, no adapter files (training routes read none)."""
    TenantStore(root)
    token = new_token()
    with sqlite3.connect(root / "tenants.sqlite") as con:
        cur = con.execute(
            "INSERT INTO tenants (name, token_sha256, version, created) VALUES (?, ?, 1, 0)", (name, hash_token(token))
        )
        con.execute("INSERT INTO adapters VALUES (?, 1, ?, NULL, 0)", (cur.lastrowid, f"adapters/{name}/v1"))
    return cur.lastrowid, token


class IdleRunner(LocalRunner):
    """Starts nothing: a started job stays running until cancelled (no training here)."""

    def start(self, job_id: str, config: Path, log_file: Path, devices: list[str], handle: str | None = None) -> str:
        return f"idle:{job_id}"

    def poll(self, handle: str) -> int | None:
        return None


class NoTraining(ServiceLimits):
    """The training service's limits with a runner that starts no process: the API without the training."""

    def runner(self) -> LocalRunner:
        return IdleRunner()
