"""``ppvit serve``: encrypted inference for many tenants through shared frozen backbones.

A request carries ciphertext only (the client encrypts locally, :mod:`ppvit.serve.client`) and a
bearer token that names the tenant (:mod:`ppvit.serve.tenants`). Requests of different tenants
arriving within ``window_ms`` of each other, up to ``max_batch`` images, go through their
base model in one routed forward (:mod:`ppvit.serve.routing`); each image uses its own tenant's
adapter. Adapters load lazily into an LRU cache with a byte budget; one that cannot be
loaded fails its tenant's requests with 503 and nobody else's.

HTTP API: ``POST /v1/predict`` (body: one PNG, ``application/x-npy`` uint8 array(s) of
shape (H, W, 3) or (N, H, W, 3), or JSON ``{"images": [base64 PNG, ...]}``), ``GET /v1/adapter``
(the tenant's own settings), ``GET /healthz``; ``GET /metrics`` (Prometheus) and ``/docs``,
``/openapi.json`` only when asked for (``metrics``, ``docs``). Every error is a status code
with one-line JSON ``{"error": ...}``.

Limits, so that no client holds more than its share: a connection cap and a deadline for a
request's headers (:func:`guarded_protocol`) and for its body, a budget of body bytes held in
memory at once, a cap on each tenant's requests in flight (429), and a batcher that schedules
images, not requests: the tenants' queues are taken in turn an image at a time, large requests
split across forward passes, and passes kept short while several tenants are active (one
tenant's large requests do not delay another's one image).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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
from starlette.requests import ClientDisconnect

from ppvit.models.adapters import AdapterMeta, adapter_files, build_base, file_sha256, read_adapter_meta
from ppvit.models.backbones import normalization
from ppvit.serve.jobs import ServiceLimits
from ppvit.serve.routing import RoutedAdapter, RoutedViT, routed_adapter
from ppvit.serve.tenants import TenantAdapter, TenantStore, check_meta

log = logging.getLogger(__name__)
access_log = logging.getLogger("ppvit.serve.access")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_HEADER_LIMIT = 1024  # bytes of a .npy header; a real one is under 128


@dataclass
class ServeConfig:
    """How the server batches, what it accepts and how much adapter memory it keeps."""

    root: Path
    window_ms: float = 5.0  # how long the first request of a batch waits for others
    max_batch: int = 64  # images per routed forward
    shared_pass_ms: float = 20.0  # per-image compute of a pass, shared fairly, while several tenants are active
    max_images: int = 64  # images per request
    max_body_bytes: int = 32 << 20
    cache_bytes: int = 1 << 30  # adapter tensors kept resident (LRU beyond it)
    device: str = "cpu"
    max_connections: int = 1000  # open connections; more are closed at once
    header_timeout_s: float = 10.0  # from a request's first byte (or the connection's opening) to its last header
    body_timeout_s: float = 30.0  # to receive a whole body
    body_budget_bytes: int = 256 << 20  # request bodies held in memory at once, all tenants (503 beyond)
    tenant_requests: int = 8  # one tenant's predict requests in flight (429 beyond)
    min_free_bytes: int = 64 << 20  # free space on the store's disk under which /healthz says degraded
    metrics: bool = False  # serve GET /metrics (it shows every tenant's traffic: bind it privately)
    docs: bool = False  # serve /docs and /openapi.json
    training: ServiceLimits | None = None  # fine-tuning as a service on (ppvit.serve.training_api)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.max_images > self.max_batch:
            raise ValueError(f"max images per request ({self.max_images}) exceeds the batch ({self.max_batch})")
        if self.body_budget_bytes < self.max_body_bytes:
            raise ValueError(f"the body budget ({self.body_budget_bytes}) is under one body ({self.max_body_bytes})")


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


def base_identity(meta: AdapterMeta, weights_sha256: str | None) -> str:
    """Adapters with the same identity share one backbone: the weights file's own hash (a file may
    stand in for timm's download, which the adapter does not record), and for a random-init base
    its head size too."""
    weights = weights_sha256 or meta.weights_sha256
    ident = [meta.model, weights, meta.pretrained, meta.init_seed, sorted(meta.model_kwargs.items())]
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
        self._digests: dict[tuple[str, int, int], str] = {}  # weights files hashed, by path, size and mtime

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
            check_meta(meta, tenant.folder)
            base = self._base(meta, tenant)
            tensors = load_file(str(adapter_files(tenant.folder)[1]))  # a store of 0.3 or earlier: PEFT's names
            adapter = routed_adapter(meta, tensors, base.routed.base).to(self.device)
        except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
            log.warning("tenant %s, adapter version %d: %s", tenant.tenant, tenant.version, exc)
            raise HTTPError(
                503, f"the adapter of tenant {tenant.tenant} cannot be loaded (see the server log)"
            ) from None
        return Served(tenant, adapter, base)

    def _digest(self, path: Path | None) -> str | None:
        if path is None:
            return None
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    def _base(self, meta: AdapterMeta, tenant: TenantAdapter) -> Base:
        with self._base_lock:
            ident = base_identity(meta, self._digest(tenant.weights))
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


@dataclass(eq=False)
class Job:
    """One request's images; a large one is computed in pieces across forward passes."""

    served: Served
    images: torch.Tensor  # (n, C, H, W) normalised
    future: asyncio.Future
    taken: int = 0  # images handed to a forward pass so far
    rows: list[torch.Tensor] = field(default_factory=list)  # their logits (one row per image, its own classes)

    def deliver(self, rows: list[torch.Tensor]) -> None:
        """The logits of this job's next piece; the request is answered when all its images have them."""
        self.rows.extend(rows)
        if len(self.rows) == len(self.images) and not self.future.done():
            self.future.set_result(self.rows)


@dataclass(frozen=True)
class Piece:
    job: Job
    start: int
    stop: int


ACTIVE_S = 1.0  # a tenant counts as sharing the server for this long after its last request arrived


class PassTimes:
    """A base's forward time as ``fixed + per_image * n``, fitted on its recent passes.

    Only the per-image part is charged to a tenant's share of a pass: charging the fixed part
    (dispatch, gathering adapters) per image would make small passes look dear and shrink them
    further. Until passes of different sizes have been seen, the average time per image stands in
    (an overestimate: shares come out smaller, never larger).
    """

    def __init__(self, keep: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=keep)
        self.slope: float | None = None

    def add(self, images: int, seconds: float) -> None:
        self.samples.append((images, seconds))
        ns = np.array([n for n, _ in self.samples], dtype=float)
        ts = np.array([t for _, t in self.samples])
        if ns.var() >= 1.0:  # sizes vary enough to read a slope; else the last one stands
            slope = float(((ns - ns.mean()) * (ts - ts.mean())).mean() / ns.var())
            average = float(ts.sum() / ns.sum())
            self.slope = min(max(slope, 0.2 * average), average)  # timing noise kept within sense

    @property
    def per_image(self) -> float:
        if self.slope is not None:
            return self.slope
        return sum(t for _, t in self.samples) / sum(n for n, _ in self.samples) if self.samples else float("inf")


def fair_shares(demand: dict[int, float], budget: float) -> dict[int, float]:
    """Max-min fair division of ``budget`` (water filling): a tenant needing less than an equal
    share gets what it needs, and what it leaves is divided among the others."""
    shares, left = {}, budget
    for i, tenant in enumerate(sorted(demand, key=demand.__getitem__)):
        shares[tenant] = min(demand[tenant], left / (len(demand) - i))
        left -= shares[tenant]
    return shares


class Batcher:
    """Collects requests for ``window`` seconds (or ``max_batch`` images) and runs one routed forward per base.

    Scheduling is by images, not requests, so that a tenant sending large requests cannot make a
    neighbour's small one wait behind them (deficit round robin over compute). Each tenant has its
    own queue. While only one tenant is active a pass takes up to ``max_batch`` images; while
    several are (a request within the last second), ``shared_pass`` seconds of per-image compute
    (each base's measured time per image) are divided max-min fairly among the waiting tenants,
    each getting at least one image a pass, large requests being split across passes and answered
    whole. A request arriving during a pass thus waits for about one ``shared_pass``, and its own.
    """

    def __init__(self, window: float, max_batch: int, metrics: Metrics, shared_pass: float = 0.02) -> None:
        self.window, self.max_batch, self.metrics, self.shared_pass = window, max_batch, metrics, shared_pass
        self.queues: OrderedDict[int, deque[Job]] = OrderedDict()  # by tenant id
        self.seen: dict[int, float] = {}  # tenant id -> when its last request arrived
        self.times: dict[int, PassTimes] = {}  # by id(base)
        self.queued = 0  # images waiting
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ppvit-forward")
        self.closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Refuse new jobs, answer every job already queued, then stop the loop."""
        self.closing = True
        self.arrived.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=60)
            self._task.cancel()
        for queue in self.queues.values():  # only if the loop died: never left unanswered
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(HTTPError(503, "the server is shutting down"))
        self.executor.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, served: Served, images: torch.Tensor) -> list[torch.Tensor]:
        """The logits of ``images`` (one row each), computed with ``served``'s adapter."""
        if self.closing or not self.alive:
            raise HTTPError(503, "the server is shutting down")
        if not len(images):  # nothing to schedule (a job must give at least one image to a pass)
            return []
        loop = asyncio.get_running_loop()
        tenant = served.tenant.tenant_id
        future = loop.create_future()
        self.queues.setdefault(tenant, deque()).append(Job(served, images, future))
        self.seen[tenant] = loop.time()
        self.queued += len(images)
        self.arrived.set()
        return await future

    def sharing(self) -> bool:
        """Whether more than one tenant is active (forgetting tenants idle for ``ACTIVE_S``)."""
        now = asyncio.get_running_loop().time()
        self.seen = {t: when for t, when in self.seen.items() if now - when < ACTIVE_S or t in self.queues}
        return len(self.seen) > 1

    def take(self) -> list[Piece]:
        """The next pass: each waiting tenant's share, in turn, up to ``max_batch`` images in all.

        Requests whose client left are dropped. A pass always takes at least one image.
        """
        for tenant in list(self.queues):
            queue = self.queues[tenant]
            while queue and queue[0].future.done():  # cancelled: nobody to answer
                job = queue.popleft()
                self.queued -= len(job.images) - job.taken
            if not queue:
                del self.queues[tenant]
        budget = self.shared_pass if self.sharing() else float("inf")
        cost = {  # seconds per image of each tenant's base; unmeasured: the whole budget (one image a pass)
            t: self.times[id(q[0].served.base)].per_image if id(q[0].served.base) in self.times else budget
            for t, q in self.queues.items()
        }
        demand = {t: cost[t] * sum(len(j.images) - j.taken for j in q) for t, q in self.queues.items()}
        shares = fair_shares(demand, budget)
        taken: dict[Job, int] = {}  # job -> images taken this pass (insertion order = pass order)
        served: list[int] = []
        count = 0
        for tenant in list(self.queues):
            queue, spent, before = self.queues[tenant], 0.0, count
            while queue and count < self.max_batch:
                job = queue[0]
                if job.future.done():  # its client left while earlier pieces ran
                    self.queued -= len(queue.popleft().images) - job.taken
                    continue
                if spent > 0 and spent + cost[tenant] > shares[tenant] * (1 + 1e-9):
                    break
                spent, count = spent + cost[tenant], count + 1
                taken[job] = taken.get(job, 0) + 1
                job.taken += 1
                self.queued -= 1
                if job.taken == len(job.images):
                    queue.popleft()
            if count > before:
                served.append(tenant)
            if not queue:
                del self.queues[tenant]
        for tenant in served:  # served tenants go to the back, in the order they were served
            if tenant in self.queues:
                self.queues.move_to_end(tenant)
        return [Piece(job, job.taken - n, job.taken) for job, n in taken.items()]

    async def _wait(self, timeout: float | None) -> bool:
        """Until a job arrives (True) or ``timeout`` passes (False)."""
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queues:
                if self.closing:
                    return
                await self._wait(None)
            deadline = loop.time() + self.window
            while self.queued < self.max_batch and not self.closing and deadline > loop.time():
                if not await self._wait(deadline - loop.time()):
                    break
            by_base: dict[int, list[Piece]] = {}
            for piece in self.take():
                by_base.setdefault(id(piece.job.served.base), []).append(piece)
            for pieces in by_base.values():
                try:
                    await self._forward(pieces)
                except Exception:  # a failed forward fails its own requests, never the loop
                    log.exception("routed forward failed")
                    for piece in pieces:
                        if not piece.job.future.done():
                            piece.job.future.set_exception(HTTPError(500, "inference failed (see the server log)"))

    async def _forward(self, pieces: list[Piece]) -> None:
        adapters: dict[tuple[int, int], int] = {}
        for p in pieces:
            adapters.setdefault(p.job.served.tenant.cache_key, len(adapters))
        unique = {p.job.served.tenant.cache_key: p.job.served.adapter for p in pieces}
        index = torch.cat([torch.full((p.stop - p.start,), adapters[p.job.served.tenant.cache_key]) for p in pieces])
        x = torch.cat([p.job.images[p.start : p.stop] for p in pieces])
        base = pieces[0].job.served.base
        self.metrics.batch_size.observe(len(x))
        self.metrics.batch_tenants.observe(len(adapters))
        t0 = time.perf_counter()
        logits = await asyncio.get_running_loop().run_in_executor(
            self.executor, base.routed, x.to(base.mean.device), list(unique.values()), index
        )
        self.times.setdefault(id(base), PassTimes()).add(len(x), time.perf_counter() - t0)
        start = 0
        for p in pieces:
            n = p.stop - p.start
            if not p.job.future.done():  # a client that went away left a cancelled future
                p.job.deliver(logits[start : start + n])
            start += n


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
        if count < 1:
            raise HTTPError(422, "no images in the request")
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
        try:  # ValueError: a number over Python's digit limit; RecursionError: nesting too deep
            items = json.loads(body)["images"]
            if not isinstance(items, list):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise HTTPError(400, 'JSON body must be {"images": [base64 PNG, ...]}') from None
        if len(items) > expected.max_images:
            raise HTTPError(413, f"{len(items)} images in one request; the limit is {expected.max_images}")
        try:
            blobs = [base64.b64decode(s, validate=True) for s in items]
        except (binascii.Error, TypeError, ValueError):
            raise HTTPError(400, "JSON images must be base64 strings") from None
        images = np.stack([_png(b, i, expected) for i, b in enumerate(blobs)]) if blobs else None
    elif kind == "image/png":
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
        shape, fortran, dtype = read(buf, max_header_size=NPY_HEADER_LIMIT)
    except (ValueError, OSError, EOFError, SyntaxError, RecursionError, MemoryError):
        raise HTTPError(400, "body is not a .npy array") from None
    if dtype != np.uint8:
        raise HTTPError(422, f"array dtype is {dtype}; send uint8 ciphertext")
    if len(shape) not in (3, 4) or any(type(n) is not int or n < 0 for n in shape):
        raise HTTPError(422, f"array shape {shape}: expected (H, W, C) or (N, H, W, C)")
    shape4 = shape if len(shape) == 4 else (1, *shape)
    expected.check(*shape4)
    if len(body) - buf.tell() != int(np.prod(shape)):
        raise HTTPError(400, f"array of shape {shape} needs {int(np.prod(shape))} bytes, the body holds another number")
    data = np.frombuffer(body, dtype=np.uint8, offset=buf.tell())
    return data.reshape(shape4, order="F" if fortran else "C")


def _png(data: bytes, i: int, expected: Expected) -> np.ndarray:
    """One PNG, and only a PNG: no other PIL decoder is reached."""
    if not data.startswith(PNG_SIGNATURE):
        raise HTTPError(415, f"image {i} is not a PNG (the API takes PNG images only)")
    try:  # ValueError: a text or ICC chunk that inflates past PIL's limits
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            expected.check(1, im.height, im.width, len(im.getbands()))
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
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
    """Every answer that is not 200, ours or the framework's, as one line of JSON; requests counted
    by route and written to the access log (never the token)."""

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
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # anything unforeseen: one line of JSON, the details in the server log
            log.exception("request failed")
            response = JSONResponse({"error": "internal error (see the server log)"}, status_code=500)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        client = request.client.host if request.client else "-"
        tenant = getattr(request.state, "tenant", "-")
        access_log.info(
            "%s %s %s %d %.1f ms tenant=%s",
            client,
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - t0) * 1000,
            tenant,
        )
        return response


class Limits:
    """What the server holds for its clients at once: body bytes in memory (all tenants) and each
    tenant's predict requests in flight. Used from the event loop only: no lock."""

    def __init__(self, body_budget: int, per_tenant: int) -> None:
        self.body_budget, self.per_tenant = body_budget, per_tenant
        self.body_bytes = 0
        self.in_flight: dict[int, int] = {}

    def enter(self, tenant: TenantAdapter) -> None:
        n = self.in_flight.get(tenant.tenant_id, 0)
        if n >= self.per_tenant:
            raise HTTPError(429, f"tenant {tenant.tenant}: {n} requests in flight; the limit is {self.per_tenant}")
        self.in_flight[tenant.tenant_id] = n + 1

    def leave(self, tenant: TenantAdapter) -> None:
        n = self.in_flight.pop(tenant.tenant_id) - 1
        if n:
            self.in_flight[tenant.tenant_id] = n

    def reserve(self, nbytes: int) -> None:
        if self.body_bytes + nbytes > self.body_budget:
            raise HTTPError(503, "the server holds as many request bodies as it takes; retry shortly")
        self.body_bytes += nbytes


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI application over ``cfg.root`` (created on first start)."""
    store = TenantStore(cfg.root, hold_reader=True)
    cache = AdapterCache(cfg.cache_bytes, cfg.device)
    metrics = Metrics()
    limits = Limits(cfg.body_budget_bytes, cfg.tenant_requests)
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(cfg.window_ms / 1000, cfg.max_batch, metrics, cfg.shared_pass_ms / 1000)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()
        store.close()

    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="ppvit", lifespan=lifespan, **docs)

    _one_line_errors(app, metrics)

    async def resolve(request: Request) -> Served:
        values = request.headers.getlist("authorization")
        if len(values) > 1:
            raise HTTPError(400, "more than one Authorization header")
        scheme, _, token = (values[0] if values else "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "missing bearer token")
        try:
            tenant = await asyncio.to_thread(store.by_token, token.strip())
        except ValueError as exc:
            log.error("tenant registry: %s", exc)
            raise HTTPError(503, "the tenant registry cannot be read (see the server log)") from None
        if tenant is None:
            raise HTTPError(401, "unknown token")
        request.state.tenant = tenant.tenant
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
        free = shutil.disk_usage(cfg.root).free
        problems = [] if free >= cfg.min_free_bytes else [f"store disk: {free} bytes free, registration will fail"]
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "adapters_resident": len(cache.adapters),
            "bases": len(cache.bases),
        }

    if cfg.metrics:

        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/adapter")
    async def adapter(request: Request) -> dict[str, Any]:
        return adapter_info(await resolve(request), cfg.max_images)

    @app.post("/v1/predict")
    async def predict(request: Request, logits: bool = False) -> Response:
        t0 = time.perf_counter()
        served = await resolve(request)
        limits.enter(served.tenant)
        held = [0]  # body bytes reserved by this request
        try:
            body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s, limits, held)
            expected = Expected(served.base.routed.side, served.base.routed.in_channels, cfg.max_images)
            kind = request.headers.get("content-type", "")
            images = await asyncio.to_thread(decode_images, body, kind, expected)  # off the event loop
            del body
            x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(served.base.mean.device).float().div_(255)
            x = (x - served.base.mean) / served.base.std
            rows = await state["batcher"].submit(served, x)
            answer = await asyncio.to_thread(answers_json, served, rows, logits)
        finally:
            limits.leave(served.tenant)
            limits.body_bytes -= held[0]
        metrics.latency.observe(time.perf_counter() - t0)
        return Response(answer, media_type="application/json")

    if cfg.training is not None:
        from ppvit.serve.training_api import training_router  # it imports this module

        app.include_router(training_router(cfg.root, store, cfg.training, cfg.body_timeout_s))
    return app


def answers_json(served: Served, rows: list[torch.Tensor], logits: bool) -> bytes:
    """The predict answer as JSON bytes (built off the event loop: a large head makes it long)."""
    classes = class_names(served.meta)
    answers = []
    for row in rows:
        p = row.softmax(-1)
        i = int(p.argmax())
        answer = {"label": classes[i], "index": i, "probability": float(p[i]), "probabilities": p.tolist()}
        if logits:
            answer["logits"] = row.tolist()
        answers.append(answer)
    doc = {"tenant": served.tenant.tenant, "version": served.tenant.version, "predictions": answers}
    return json.dumps(doc).encode()


async def read_body(request: Request, limit: int, timeout: float, limits: Limits, held: list[int]) -> bytes:
    """The body within ``timeout`` seconds, refused with 413 as soon as it exceeds ``limit``
    (declared or streamed) and with 503 when the server's body budget cannot hold it; ``held[0]``
    counts the bytes reserved from the budget (the caller gives them back)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body of {declared} bytes; the limit is {limit}")
    expected = int(declared) if declared is not None and declared.isdigit() else 0
    limits.reserve(expected)
    held[0] = expected
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise HTTPError(413, f"body over {limit} bytes")
                if len(body) + len(chunk) > held[0]:  # sent without a length, or more than it declared
                    limits.reserve(len(body) + len(chunk) - held[0])
                    held[0] = len(body) + len(chunk)
                body += chunk
    except TimeoutError:
        raise HTTPError(408, f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise HTTPError(499, "the client closed the connection") from None
    return bytes(body)


def guarded_protocol(max_connections: int, header_timeout: float) -> type:
    """uvicorn's h11 protocol with a cap on open connections (one past it is closed at once) and a
    deadline for each request's headers, from the connection's opening or the request's first byte
    (uvicorn's keep-alive timeout covers only the idle time after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # bytes of a request whose headers are not all in yet
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _expired(self) -> None:
            self.header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
):
    """The uvicorn settings of ``ppvit serve`` (the tests start the same)."""
    import uvicorn

    return uvicorn.Config(
        create_app(cfg),
        host=host,
        port=port,
        http=guarded_protocol(cfg.max_connections, cfg.header_timeout_s),
        log_level="warning",
        access_log=False,  # ours names the tenant (ppvit.serve.access)
        timeout_graceful_shutdown=30,
        timeout_keep_alive=5,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )


def exposure_warning(host: str, tls: bool) -> str | None:
    """A warning for a server reachable beyond this machine without TLS (tokens would cross in clear)."""
    if tls:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"warning: listening on {host} without TLS: tokens and ciphertext cross the network in clear. "
        "Put a TLS reverse proxy in front (and bind 127.0.0.1), or pass --ssl-certfile and --ssl-keyfile"
    )


def serve(
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM; requests in flight are answered before it exits."""
    import uvicorn

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (ssl_certfile, ssl_keyfile):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"TLS file {path}: not found")
    warning = exposure_warning(host, ssl_certfile is not None)
    if warning:
        log.warning("%s", warning)
    uvicorn.Server(uvicorn_config(cfg, host, port, ssl_certfile, ssl_keyfile)).run()
