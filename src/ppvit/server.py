"""``ppvit serve``: encrypted inference for many tenants through shared frozen backbones.

A request carries ciphertext only (the client encrypts locally, :mod:`ppvit.client`) and a
bearer token that names the tenant (:mod:`ppvit.tenants`). Requests of different tenants
arriving within ``window_ms`` of each other, up to ``max_batch`` images, go through their
base model in one routed forward (:mod:`ppvit.routing`); each image uses its own tenant's
adapter. Adapters load lazily into an LRU cache with a byte budget; one that cannot be
loaded fails its tenant's requests with 503 and nobody else's.

HTTP API: ``POST /v1/predict`` (body: one PNG, ``application/x-npy`` uint8 array(s) of
shape (H, W, 3) or (N, H, W, 3), or JSON ``{"images": [base64 PNG, ...]}``), ``GET /v1/adapter``
(the tenant's own settings), ``GET /healthz``, ``GET /metrics`` (Prometheus). Every error is
a status code with one-line JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapters import WEIGHTS_NAME, AdapterMeta, build_base, read_adapter_meta
from .backbones import normalization
from .routing import RoutedAdapter, RoutedViT, routed_adapter
from .tenants import TenantAdapter, TenantStore

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How the server batches, what it accepts and how much adapter memory it keeps."""

    root: Path
    window_ms: float = 5.0  # how long the first request of a batch waits for others
    max_batch: int = 64  # images per routed forward
    max_images: int = 64  # images per request
    max_body_bytes: int = 32 << 20
    cache_bytes: int = 1 << 30  # adapter tensors kept resident (LRU beyond it)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.max_images > self.max_batch:
            raise ValueError(f"max images per request ({self.max_images}) exceeds the batch ({self.max_batch})")


class HTTPError(Exception):
    """An answer with a status code and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- models and adapters ---------------------------------------------------------------------------


@dataclass
class Served:
    """A tenant's adapter, ready: its base (shared), its routed tensors and input checks."""

    tenant: TenantAdapter
    adapter: RoutedAdapter
    base: Base

    @property
    def meta(self) -> AdapterMeta:
        return self.adapter.meta


@dataclass
class Base:
    """One frozen backbone shared by every adapter trained on it."""

    routed: RoutedViT
    mean: torch.Tensor
    std: torch.Tensor


def base_identity(meta: AdapterMeta) -> str:
    """Adapters with the same identity share one backbone (a random-init base depends on its head size too)."""
    ident = [meta.model, meta.weights_sha256, meta.pretrained, meta.init_seed, sorted(meta.model_kwargs.items())]
    if meta.init_seed is not None:
        ident.append(meta.num_classes)
    return json.dumps(ident)


class AdapterCache:
    """Adapters by (tenant, version), least recently used dropped beyond ``budget`` bytes; bases built once."""

    def __init__(self, budget: int, device: str) -> None:
        self.budget, self.device = budget, torch.device(device)
        self.adapters: OrderedDict[tuple[int, int], Served] = OrderedDict()
        self.bases: dict[str, Base] = {}
        self.lock = threading.Lock()

    @property
    def resident_bytes(self) -> int:
        return sum(s.adapter.nbytes for s in self.adapters.values())

    def get(self, tenant: TenantAdapter) -> Served:
        with self.lock:
            served = self.adapters.get(tenant.cache_key)
            if served is not None:
                self.adapters.move_to_end(tenant.cache_key)
                return served
            served = self._load(tenant)
            self.adapters[tenant.cache_key] = served
            while self.resident_bytes > self.budget and len(self.adapters) > 1:
                self.adapters.popitem(last=False)
            return served

    def _load(self, tenant: TenantAdapter) -> Served:
        try:
            meta = read_adapter_meta(tenant.folder)
            ident = base_identity(meta)
            if ident not in self.bases:
                model = build_base(meta, tenant.weights).to(self.device)
                mean, std = normalization(model)
                shape = (1, -1, 1, 1)
                self.bases[ident] = Base(
                    RoutedViT(model), torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
                )
            base = self.bases[ident]
            tensors = load_file(str(tenant.folder / WEIGHTS_NAME))
            adapter = routed_adapter(meta, tensors, base.routed.base)
        except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise HTTPError(503, f"the adapter of tenant {tenant.tenant} cannot be loaded: {first}") from None
        return Served(tenant, adapter, base)


# -- batching -----------------------------------------------------------------------------------


@dataclass
class Job:
    served: Served
    images: torch.Tensor  # (n, C, H, W) normalised
    future: asyncio.Future


class Batcher:
    """Collects jobs for ``window`` seconds (or ``max_batch`` images) and runs one routed forward per base."""

    def __init__(self, window: float, max_batch: int, metrics: Metrics) -> None:
        self.window, self.max_batch, self.metrics = window, max_batch, metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ppvit-forward")
        self.closing = False
        self._carry: Job | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Answer what is queued, then stop; later submissions are refused."""
        self.closing = True
        while self._carry is not None or not self.queue.empty():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=True)

    async def submit(self, served: Served, images: torch.Tensor) -> list[torch.Tensor]:
        if self.closing:
            raise HTTPError(503, "the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(served, images, future))
        return await future

    async def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(timeout, 0))
        except TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, count, deadline = [first], len(first.images), loop.time() + self.window
            while count < self.max_batch:
                job = await self._next(deadline - loop.time())
                if job is None:
                    break
                if count + len(job.images) > self.max_batch:
                    self._carry = job
                    break
                batch.append(job)
                count += len(job.images)
            by_base: dict[int, list[Job]] = {}
            for job in batch:
                by_base.setdefault(id(job.served.base), []).append(job)
            for jobs in by_base.values():
                await self._forward(jobs)

    async def _forward(self, jobs: list[Job]) -> None:
        adapters: dict[tuple[int, int], int] = {}
        for job in jobs:
            adapters.setdefault(job.served.tenant.cache_key, len(adapters))
        unique = {job.served.tenant.cache_key: job.served.adapter for job in jobs}
        index = torch.cat([torch.full((len(j.images),), adapters[j.served.tenant.cache_key]) for j in jobs])
        x = torch.cat([j.images for j in jobs])
        base = jobs[0].served.base
        self.metrics.batch_size.observe(len(x))
        self.metrics.batch_tenants.observe(len(adapters))
        try:
            logits = await asyncio.get_running_loop().run_in_executor(
                self.executor, base.routed, x.to(base.mean.device), list(unique.values()), index
            )
        except Exception as exc:  # a failed forward fails its own requests, not the server
            log.exception("routed forward failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(HTTPError(500, f"inference failed: {type(exc).__name__}"))
            return
        start = 0
        for job in jobs:
            if not job.future.done():  # a client that went away left a cancelled future
                job.future.set_result(logits[start : start + len(job.images)])
            start += len(job.images)


# -- metrics ------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ppvit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "ppvit_request_seconds",
            "predict latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.batch_size = Histogram("ppvit_batch_images", "images per routed forward", buckets=sizes, registry=r)
        self.batch_tenants = Histogram("ppvit_batch_adapters", "adapters per routed forward", buckets=sizes, registry=r)
        self.resident = Gauge("ppvit_adapters_resident", "adapters in memory", registry=r)
        self.resident_bytes = Gauge("ppvit_adapter_bytes_resident", "bytes of adapter tensors in memory", registry=r)


# -- request parsing ----------------------------------------------------------------------------


def decode_images(body: bytes, content_type: str, max_images: int) -> np.ndarray:
    """The request's images as (N, H, W, C) uint8; HTTPError 400/413 for what is not that."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-npy":
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise HTTPError(400, f"body is not a .npy array ({exc})") from None
        if arr.dtype != np.uint8:
            raise HTTPError(422, f"array dtype is {arr.dtype}; send uint8 ciphertext")
        images = arr[None] if arr.ndim == 3 else arr
        if images.ndim != 4:
            raise HTTPError(422, f"array shape {arr.shape}: expected (H, W, C) or (N, H, W, C)")
    elif kind == "application/json":
        try:
            items = json.loads(body)["images"]
            if not isinstance(items, list):
                raise TypeError
            blobs = [base64.b64decode(s, validate=True) for s in items]
        except (json.JSONDecodeError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            raise HTTPError(400, 'JSON body must be {"images": [base64 PNG, ...]}') from None
        images = _stack([_png(b, i) for i, b in enumerate(blobs)])
    elif kind.startswith("image/"):
        images = _png(body, 0)[None]
    else:
        raise HTTPError(415, f"content type {kind or 'missing'}: send image/png, application/x-npy or application/json")
    if len(images) == 0:
        raise HTTPError(422, "no images in the request")
    if len(images) > max_images:
        raise HTTPError(413, f"{len(images)} images in one request; the limit is {max_images}")
    return images


def _png(data: bytes, i: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 4096 * 4096:
                raise HTTPError(413, f"image {i} is {im.width}x{im.height}: too large")
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise HTTPError(400, f"image {i} is not a readable image") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _stack(images: list[np.ndarray]) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise HTTPError(422, f"images of different shapes in one request: {sorted(shapes)}")
    return np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)


def check_shape(images: np.ndarray, served: Served) -> None:
    side, channels = served.base.routed.side, served.base.routed.base.patch_embed.proj.in_channels
    _, h, w, c = images.shape
    if c != channels:
        raise HTTPError(422, f"images have {c} channels; the model takes {channels}")
    if (h, w) != (side, side):
        raise HTTPError(422, f"images are {h}x{w}; the model takes {side}x{side} ciphertext (encrypt at that size)")


def adapter_info(served: Served) -> dict[str, Any]:
    """What a tenant may know about its own adapter (never another's, never a key)."""
    meta = served.meta
    return {
        "tenant": served.tenant.tenant,
        "version": served.tenant.version,
        "model": meta.model,
        "method": meta.method.get("method"),
        "input_size": served.base.routed.side,
        "scheme": meta.scheme,
        "block_size": meta.block_size,
        "key_fingerprint": meta.key_fingerprint,
        "classes": meta.classes or [str(i) for i in range(meta.num_classes)],
    }


# -- the application ----------------------------------------------------------------------------


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI application over ``cfg.root`` (created on first start)."""
    store = TenantStore(cfg.root)
    cache = AdapterCache(cfg.cache_bytes, cfg.device)
    metrics = Metrics()
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(cfg.window_ms / 1000, cfg.max_batch, metrics)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()

    app = FastAPI(title="ppvit", lifespan=lifespan)

    @app.exception_handler(HTTPError)
    async def _error(request: Request, exc: HTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    async def resolve(request: Request) -> Served:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "missing bearer token")
        tenant = await asyncio.to_thread(store.by_token, token.strip())
        if tenant is None:
            raise HTTPError(401, "unknown token")
        served = await asyncio.to_thread(cache.get, tenant)
        metrics.resident.set(len(cache.adapters))
        metrics.resident_bytes.set(cache.resident_bytes)
        return served

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "adapters_resident": len(cache.adapters), "bases": len(cache.bases)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/adapter")
    async def adapter(request: Request) -> dict[str, Any]:
        return adapter_info(await resolve(request))

    @app.post("/v1/predict")
    async def predict(request: Request, logits: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        served = await resolve(request)
        body = await read_body(request, cfg.max_body_bytes)
        images = decode_images(body, request.headers.get("content-type", ""), cfg.max_images)
        check_shape(images, served)
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255)
        x = (x - served.base.mean) / served.base.std
        rows = await state["batcher"].submit(served, x)
        classes = adapter_info(served)["classes"]
        answers = []
        for row in rows:
            p = row.softmax(-1)
            i = int(p.argmax())
            answer = {"label": classes[i], "index": i, "probability": float(p[i]), "probabilities": p.tolist()}
            if logits:
                answer["logits"] = row.tolist()
            answers.append(answer)
        metrics.latency.observe(time.perf_counter() - t0)
        return {"tenant": served.tenant.tenant, "version": served.tenant.version, "predictions": answers}

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until SIGINT/SIGTERM; requests in flight are answered before it exits."""
    import uvicorn

    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
