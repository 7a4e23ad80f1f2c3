"""``ppvit serve``: encrypted inference for many tenants through shared frozen backbones.

A request carries ciphertext only (the client encrypts locally, :mod:`ppvit.serve.client`) and a
bearer token that names the tenant (:mod:`ppvit.serve.tenants`). Requests of different tenants
arriving within ``window_ms`` of each other, up to ``max_batch`` images, go through their
base model in one routed forward (:mod:`ppvit.serve.routing`); each image uses its own tenant's
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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from safetensors import SafetensorError
from safetensors.torch import load_file
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppvit.models.adapters import WEIGHTS_NAME, AdapterMeta, build_base, read_adapter_meta
from ppvit.models.backbones import normalization
from ppvit.serve.routing import RoutedAdapter, RoutedViT, routed_adapter
from ppvit.serve.tenants import TenantAdapter, TenantStore

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
    """Adapters by (tenant, version), least recently used dropped beyond ``budget`` bytes; bases built once.

    The cache's lock guards only its dictionaries: a slow load (a base model built, a weights
    file hashed) holds a lock of its own key, so other tenants' requests are not held up by it.
    """

    def __init__(self, budget: int, device: str) -> None:
        self.budget, self.device = budget, torch.device(device)
        self.adapters: OrderedDict[tuple[int, int], Served] = OrderedDict()
        self.bases: dict[str, Base] = {}
        self.resident_bytes = 0
        self.lock = threading.Lock()  # the dictionaries and the byte count
        self._loading: dict[tuple[int, int], threading.Lock] = {}
        self._base_lock = threading.Lock()

    def get(self, tenant: TenantAdapter) -> Served:
        key = tenant.cache_key
        with self.lock:
            if key in self.adapters:
                self.adapters.move_to_end(key)
                return self.adapters[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key; others wait here, not on the cache
            with self.lock:
                if key in self.adapters:
                    return self.adapters[key]
            served = self._load(tenant)
            with self.lock:
                self.adapters[key] = served
                self.resident_bytes += served.adapter.nbytes
                while self.resident_bytes > self.budget and len(self.adapters) > 1:
                    self.resident_bytes -= self.adapters.popitem(last=False)[1].adapter.nbytes
                self._loading.pop(key, None)
            return served

    def _load(self, tenant: TenantAdapter) -> Served:
        try:
            meta = read_adapter_meta(tenant.folder)
            base = self._base(meta, tenant)
            tensors = load_file(str(tenant.folder / WEIGHTS_NAME))
            adapter = routed_adapter(meta, tensors, base.routed.base).to(self.device)
        except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
            log.warning("tenant %s, adapter version %d: %s", tenant.tenant, tenant.version, exc)
            raise HTTPError(
                503, f"the adapter of tenant {tenant.tenant} cannot be loaded (see the server log)"
            ) from None
        return Served(tenant, adapter, base)

    def _base(self, meta: AdapterMeta, tenant: TenantAdapter) -> Base:
        ident = base_identity(meta)
        with self._base_lock:
            if ident not in self.bases:
                model = build_base(meta, tenant.weights).to(self.device)
                mean, std = normalization(model)
                shape = (1, -1, 1, 1)
                self.bases[ident] = Base(
                    RoutedViT(model),
                    torch.tensor(mean, device=self.device).view(shape),
                    torch.tensor(std, device=self.device).view(shape),
                )
            return self.bases[ident]


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
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()  # None: stop
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ppvit-forward")
        self.closing = False
        self._carry: Job | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Refuse new jobs, answer every job already taken or queued, then stop the loop."""
        self.closing = True
        await self.queue.put(None)  # the loop stops when it meets this, after what came before it
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=60)
            self._task.cancel()
        for job in [self._carry, *self._drain()]:  # only if the loop died: never left unanswered
            if job is not None and not job.future.done():
                job.future.set_exception(HTTPError(503, "the server is shutting down"))
        self.executor.shutdown(wait=False)

    def _drain(self) -> list[Job | None]:
        jobs = []
        while not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        return jobs

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, served: Served, images: torch.Tensor) -> list[torch.Tensor]:
        if self.closing or not self.alive:
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
        stopping = False
        while not stopping:
            first = await self._next(None)
            if first is None:
                return
            batch, count, deadline = [first], len(first.images), loop.time() + self.window
            while count < self.max_batch:
                job = await self._next(deadline - loop.time())
                if job is None:
                    stopping = self.closing and self.queue.empty() and self._carry is None
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
                try:
                    await self._forward(jobs)
                except Exception:  # a failed forward fails its own requests, never the loop
                    log.exception("routed forward failed")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(HTTPError(500, "inference failed (see the server log)"))

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
        logits = await asyncio.get_running_loop().run_in_executor(
            self.executor, base.routed, x.to(base.mean.device), list(unique.values()), index
        )
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


@dataclass(frozen=True)
class Expected:
    """What the tenant's model takes: checked on headers, before anything is decoded or allocated."""

    side: int
    channels: int
    max_images: int

    def check(self, count: int, h: int, w: int, c: int) -> None:
        if count > self.max_images:
            raise HTTPError(413, f"{count} images in one request; the limit is {self.max_images}")
        if c != self.channels:
            raise HTTPError(422, f"images have {c} channels; the model takes {self.channels}")
        if (h, w) != (self.side, self.side):
            raise HTTPError(422, f"images are {h}x{w}; the model takes {self.side}x{self.side} ciphertext")


def decode_images(body: bytes, content_type: str, expected: Expected) -> np.ndarray:
    """The request's images as (N, H, W, C) uint8; HTTPError 4xx for anything else.

    Sizes and counts are checked from the ``.npy`` header or each PNG's header first, so a
    small body that declares a huge image is refused without allocating it.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-npy":
        images = _npy(body, expected)
    elif kind == "application/json":
        try:
            items = json.loads(body)["images"]
            if not isinstance(items, list):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise HTTPError(400, 'JSON body must be {"images": [base64 PNG, ...]}') from None
        if len(items) > expected.max_images:
            raise HTTPError(413, f"{len(items)} images in one request; the limit is {expected.max_images}")
        try:
            blobs = [base64.b64decode(s, validate=True) for s in items]
        except (binascii.Error, TypeError, ValueError):
            raise HTTPError(400, "JSON images must be base64 strings") from None
        images = np.stack([_png(b, i, expected) for i, b in enumerate(blobs)]) if blobs else None
    elif kind.startswith("image/"):
        images = _png(body, 0, expected)[None]
    else:
        raise HTTPError(415, f"content type {kind or 'missing'}: send image/png, application/x-npy or application/json")
    if images is None or len(images) == 0:
        raise HTTPError(422, "no images in the request")
    return images


def _npy(body: bytes, expected: Expected) -> np.ndarray:
    buf = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)
    except (ValueError, OSError, EOFError, SyntaxError):
        raise HTTPError(400, "body is not a .npy array") from None
    if dtype != np.uint8:
        raise HTTPError(422, f"array dtype is {dtype}; send uint8 ciphertext")
    if len(shape) not in (3, 4):
        raise HTTPError(422, f"array shape {shape}: expected (H, W, C) or (N, H, W, C)")
    shape4 = shape if len(shape) == 4 else (1, *shape)
    expected.check(*shape4)
    if len(body) - buf.tell() != int(np.prod(shape)):
        raise HTTPError(400, f"array of shape {shape} needs {int(np.prod(shape))} bytes, the body holds another number")
    data = np.frombuffer(body, dtype=np.uint8, offset=buf.tell())
    return data.reshape(shape4, order="F" if fortran else "C")


def _png(data: bytes, i: int, expected: Expected) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            expected.check(1, im.height, im.width, len(im.getbands()))
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise HTTPError(400, f"image {i} is not a readable image") from None
    return arr[..., None] if arr.ndim == 2 else arr


def class_names(meta: AdapterMeta) -> list[str]:
    return meta.classes or [str(i) for i in range(meta.num_classes)]


def adapter_info(served: Served, max_images: int) -> dict[str, Any]:
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
        "classes": class_names(meta),
        "max_images": max_images,
    }


# -- the application ----------------------------------------------------------------------------


def _one_line_errors(app: FastAPI, metrics: Metrics) -> None:
    """Every answer that is not 200, ours or the framework's, as one line of JSON; requests counted by route."""

    @app.exception_handler(HTTPError)
    async def _error(request: Request, exc: HTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:  # anything unforeseen: one line of JSON, the details in the server log
            log.exception("request failed")
            response = JSONResponse({"error": "internal error (see the server log)"}, status_code=500)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response


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

    _one_line_errors(app, metrics)

    async def resolve(request: Request) -> Served:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "missing bearer token")
        tenant = await asyncio.to_thread(store.by_token, token.strip())
        if tenant is None:
            raise HTTPError(401, "unknown token")
        served = await asyncio.to_thread(cache.get, tenant)
        with cache.lock:
            metrics.resident.set(len(cache.adapters))
            metrics.resident_bytes.set(cache.resident_bytes)
        return served

    @app.get("/healthz")
    async def healthz() -> Any:
        batcher = state.get("batcher")
        if batcher is None or not batcher.alive:
            return JSONResponse({"status": "batcher stopped"}, status_code=503)
        return {"status": "ok", "adapters_resident": len(cache.adapters), "bases": len(cache.bases)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/adapter")
    async def adapter(request: Request) -> dict[str, Any]:
        return adapter_info(await resolve(request), cfg.max_images)

    @app.post("/v1/predict")
    async def predict(request: Request, logits: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        served = await resolve(request)
        body = await read_body(request, cfg.max_body_bytes)
        expected = Expected(served.base.routed.side, served.base.routed.in_channels, cfg.max_images)
        kind = request.headers.get("content-type", "")
        images = await asyncio.to_thread(decode_images, body, kind, expected)  # off the event loop
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(served.base.mean.device).float().div_(255)
        x = (x - served.base.mean) / served.base.std
        rows = await state["batcher"].submit(served, x)
        classes = class_names(served.meta)
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
