"""``ppvit serve``: encrypted inference for many tenants through shared frozen backbones.

A request carries ciphertext only (the client encrypts locally, :mod:`ppvit.serve.client`) and a
bearer token that names the tenant (:mod:`ppvit.serve.auth`, :mod:`ppvit.serve.tenants`). Requests
of different tenants arriving within ``window_ms`` of each other, up to ``max_batch`` images, go
through their base model in one routed forward (:mod:`ppvit.serve.batcher`,
:mod:`ppvit.models.routing`); each image uses its own tenant's adapter
(:mod:`ppvit.serve.cache`). Bodies are decoded and answers encoded by :mod:`ppvit.serve.codec`.
This module holds the routes and the limits; :mod:`ppvit.serve.server` serves them (uvicorn, sockets, TLS).

HTTP API: ``POST /v1/predict`` (body: one PNG, ``application/x-npy`` uint8 array(s) of
shape (H, W, 3) or (N, H, W, 3), or JSON ``{"images": [base64 PNG, ...]}``; ``?top_k=``: classes
named per image, ``top_k`` by default, ``max_top_k`` at most), ``GET /v1/adapter`` (the tenant's
own settings and a predict request's limits, ``max_images`` and ``max_body_bytes``; ETag, 304 on
``If-None-Match``), ``GET /healthz``; ``GET /metrics`` (Prometheus) and
``/docs``, ``/openapi.json`` only when asked for (``metrics``, ``docs``). Every error is a status code
with one-line JSON ``{"error": ...}``.

Limits, so that no client holds more than its share: a connection cap and a deadline for a
request's headers (:func:`ppvit.serve.server.guarded_protocol`) and for its body, a budget of body bytes held in
memory at once, a cap on each tenant's requests in flight (429), and a batcher that schedules
images, not requests: the tenants' queues are taken in turn an image at a time, large requests
split across forward passes, and passes kept short while several tenants are active (one
tenant's large requests do not delay another's one image).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import time
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppvit.serve.auth import HTTPError, bearer_tenant
from ppvit.serve.batcher import Batcher
from ppvit.serve.cache import AdapterCache, Served
from ppvit.serve.codec import Expected, StrictJSONResponse, adapter_answer, answers_json, decode_images
from ppvit.serve.jobs import ServiceLimits
from ppvit.serve.limits import Limits
from ppvit.serve.metrics import Metrics
from ppvit.serve.tenants import TenantStore
from ppvit.serve.training_api import declaration_bytes, training_router

log = logging.getLogger(__name__)
access_log = logging.getLogger("ppvit.serve.access")


@dataclass
class ServeConfig:
    """How the server batches, what it accepts and how much adapter memory it keeps."""

    root: Path
    window_ms: float = 5.0  # how long the first request of a batch waits for others
    max_batch: int = 64  # images per routed forward
    shared_pass_ms: float = 20.0  # per-image compute of a pass, shared fairly, while several tenants are active
    max_images: int = 64  # images per request
    top_k: int = 5  # classes a prediction names when the request does not say (TorchServe's default)
    max_top_k: int = 20  # the most a request may ask for: bounds an answer whatever the head's class count
    max_body_bytes: int = 32 << 20
    cache_bytes: int = 1 << 30  # adapter tensors kept resident (LRU beyond it)
    slots: int = 64  # adapters a base keeps in its slot tables for mixed passes (their copies: LRU beyond it)
    slot_bytes: int = 256 << 20  # and the tables' bytes (a pass's own adapters are kept whatever their size)
    device: str = "cpu"
    cuda_graphs: bool = False  # routed passes replayed as recorded CUDA graphs (ppvit.models.graphs)
    max_connections: int = 1000  # open connections; more are closed at once
    max_client_connections: int = 100  # open connections of one client address; more are closed at once
    header_timeout_s: float = 10.0  # from a request's first byte (or the connection's opening) to its last header
    body_timeout_s: float = 30.0  # to receive a whole body
    body_budget_bytes: int = 256 << 20  # request bodies held in memory at once, all tenants (503 beyond)
    tenant_requests: int = 8  # one tenant's requests with bodies in flight, predict's and the service's (429 beyond)
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
        declaration = declaration_bytes(self.training) if self.training else 0
        if self.body_budget_bytes < declaration:  # else every large declaration was told "retry shortly", for ever
            raise ValueError(
                f"the body budget ({self.body_budget_bytes}) is under one declaration of {self.training.max_shards} "
                f"shards ({declaration} bytes): raise the budget or lower the shards a dataset may have"
            )
        if not 1 <= self.top_k <= self.max_top_k:
            raise ValueError(f"top-k ({self.top_k}): between 1 and the max top-k ({self.max_top_k})")
        if self.slots < 1 or self.slot_bytes < 0:
            raise ValueError(f"slots ({self.slots}): at least 1; slot bytes ({self.slot_bytes}): at least 0")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device {self.device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        if self.max_client_connections < 1:
            raise ValueError(f"connections per client ({self.max_client_connections}): at least 1")


# -- the application ----------------------------------------------------------------------------


def _one_line_errors(app: FastAPI, metrics: Metrics) -> None:
    """Every answer that is not 200, ours or the framework's, as one line of JSON; requests counted
    by route and written to the access log (never the token)."""

    @app.exception_handler(HTTPError)
    async def _error(request: Request, exc: HTTPError) -> StrictJSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return StrictJSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> StrictJSONResponse:
        return StrictJSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> StrictJSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return StrictJSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    app.add_middleware(AccessLog, metrics=metrics)


class AccessLog:
    """Counts each request by route and status, writes it to the access log (never the token), and answers
    an unforeseen exception with one line of JSON (500), the details in the server log.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) ran every request
    through a task group and a streamed copy of its answer, a large share of a small request's cost."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]  # of the answer, once its start is sent

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("request failed")
            if status[0]:  # the answer had begun: nothing more can be said on this connection
                raise
            await StrictJSONResponse({"error": "internal error (see the server log)"}, status_code=500)(
                scope, receive, send
            )
            status[0] = 500
        finally:  # counted and logged however it ended (an answer broken off midway: the status it began with)
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status[0])).inc()
            client = scope.get("client")
            access_log.info(
                "%s %s %s %d %.1f ms tenant=%s",
                client[0] if client else "-",
                scope["method"],
                scope["path"],
                status[0],
                (time.perf_counter() - t0) * 1000,
                scope.get("state", {}).get("tenant", "-"),
            )


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI application over ``cfg.root`` (created on first start)."""
    store = TenantStore(cfg.root, hold_reader=True)
    cache = AdapterCache(cfg.cache_bytes, cfg.device, cfg.slots, cfg.slot_bytes, cfg.cuda_graphs)
    metrics = Metrics()
    limits = Limits(cfg.body_budget_bytes, cfg.tenant_requests, cfg.max_body_bytes)
    state: dict[str, Batcher] = {}
    routes, service_lifespan = (None, nullcontext)
    if cfg.training is not None:
        routes, service_lifespan = training_router(cfg.root, store, cfg.training, limits, cfg.body_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(cfg.window_ms / 1000, cfg.max_batch, metrics, cfg.shared_pass_ms / 1000)
        batcher.start()
        state["batcher"] = batcher
        # torch, timm, FastAPI and the rest are about 490,000 objects that live as long as the process: a full
        # collection walked them all (220 ms, measured under load: the p99 of every request in flight), now
        # only what was made since. Collected first: garbage frozen would never be freed
        gc.collect()
        gc.freeze()
        try:  # the job supervisor's first read of its tables can fail (a damaged store)
            async with service_lifespan(app):
                yield
        except (ValueError, OSError) as exc:  # the store's (a bug's traceback is printed whole, by uvicorn)
            app.state.failure = exc  # for serve(): one line and a non-zero exit, not uvicorn's traceback
            raise
        finally:
            await batcher.stop()
            store.close()

    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="ppvit", lifespan=lifespan, default_response_class=StrictJSONResponse, **docs)

    _one_line_errors(app, metrics)
    metrics.watch_routing(lambda: [base.routed for base in list(cache.bases.values())])

    async def resolve(request: Request) -> Served:
        tenant = await bearer_tenant(request, store)
        served = cache.resident(tenant) or await asyncio.to_thread(cache.get, tenant)
        with cache.lock:
            metrics.resident.set(len(cache.adapters))
            metrics.resident_bytes.set(cache.resident_bytes)
        return served

    @app.get("/healthz")
    async def healthz() -> Any:
        batcher = state.get("batcher")
        if batcher is None or not batcher.alive:
            return StrictJSONResponse({"status": "batcher stopped"}, status_code=503)
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
    async def adapter(request: Request) -> Response:
        served = await resolve(request)
        # encoded already (every request but this version's first): no thread hop
        answer = served.encoded.get("adapter") or await asyncio.to_thread(
            adapter_answer, served, cfg.max_images, cfg.max_body_bytes
        )
        headers = {"ETag": answer.etag, "Cache-Control": "private, no-cache"}  # per token; revalidate each time
        if answer.matches(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=headers)
        return Response(answer.body, media_type="application/json", headers=headers)

    @app.post("/v1/predict")
    async def predict(request: Request, logits: bool = False, top_k: int | None = None) -> Response:
        t0 = time.perf_counter()
        top_k = cfg.top_k if top_k is None else top_k
        if not 1 <= top_k <= cfg.max_top_k:
            raise HTTPError(422, f"top_k: ask for 1 to {cfg.max_top_k} classes")
        served = await resolve(request)
        limits.enter(served.tenant)
        try:  # the body's bytes stay reserved until the answer: its images are held as long
            async with limits.body(request, cfg.max_body_bytes, cfg.body_timeout_s, served.tenant) as body:
                expected = Expected.of(served, cfg.max_images)
                kind = request.headers.get("content-type", "")
                images = await asyncio.to_thread(decode_images, body, kind, expected)  # off the event loop
                del body
                rows = await state["batcher"].submit(served, torch.from_numpy(np.array(images)))
                if len(rows) == 1:  # one image's answer (0.1-0.5 ms, the head's width) costs about a thread hop
                    answer = answers_json(served, rows, logits, top_k)
                else:  # up to max_images x max_top_k entries: off the event loop
                    answer = await asyncio.to_thread(answers_json, served, rows, logits, top_k)
        finally:
            limits.leave(served.tenant)
        metrics.latency.observe(time.perf_counter() - t0)
        return Response(answer, media_type="application/json")

    if routes is not None:
        app.include_router(routes)
    return app
