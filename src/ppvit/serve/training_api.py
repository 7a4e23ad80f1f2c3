"""The HTTP API of fine-tuning as a service, mounted by :func:`ppvit.serve.app.create_app` when training is on.

Every route takes the tenant's bearer token, as ``/v1/predict`` does, and sees only that
tenant's datasets and jobs (another tenant's answer 404, as a missing one does)::

    GET    /v1/datasets                         the tenant's datasets
    PUT    /v1/datasets/NAME                    declare {manifest, shards: [{path, bytes, sha256}]}: missing shards
    GET    /v1/datasets/NAME                    its manifest fields and the shards still missing
    DELETE /v1/datasets/NAME
    PUT    /v1/datasets/NAME/shards/SPLIT/FILE  one shard's bytes (checked against the declared size and SHA-256)
    POST   /v1/jobs                             {dataset, config: {flat TrainConfig settings}, activate, processes}
    GET    /v1/jobs, /v1/jobs/ID, /v1/jobs/ID/metrics
    POST   /v1/jobs/ID/cancel, /v1/jobs/ID/activate
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect

from ppvit.serve.auth import HTTPError, bearer_tenant
from ppvit.serve.codec import StrictJSONResponse
from ppvit.serve.datasets import DatasetError, DatasetStore
from ppvit.serve.jobs import Jobs, ServiceLimits
from ppvit.serve.limits import Limits
from ppvit.serve.supervisor import Supervisor, sole_supervisor
from ppvit.serve.tenants import TenantAdapter, TenantStore

SHARD_JSON = 200  # bytes of one shard's {path, bytes, sha256} in a declaration, generously
MANIFEST_JSON = 1 << 20  # a manifest's bytes, its class names (at most 512 KiB) included
JOB_JSON = 64 << 10  # a job submission: flat settings
T = TypeVar("T")


def declaration_bytes(limits: ServiceLimits) -> int:
    """The most bytes a dataset declaration may have: a manifest and its shards' specs."""
    return MANIFEST_JSON + SHARD_JSON * limits.max_shards


async def _call(fn: Callable[..., T], *args: Any) -> T:
    """A store call off the event loop; its refusal as the answer's status and line."""
    try:
        return await asyncio.to_thread(fn, *args)
    except DatasetError as exc:
        raise HTTPError(exc.status, str(exc)) from None


async def _json(request: Request, limit: int, limits: Limits, timeout: float, who: TenantAdapter) -> dict[str, Any]:
    """The body as a JSON object: read as every body is (:meth:`Limits.body`: 413, 408, the budget's 503), one of the
    tenant's requests in flight (429 past its share: one tenant's bodies held open took the budget from every
    other's predict), parsed off the event loop (a large declaration does not hold up other requests), nested too
    deep or not JSON: 400."""
    limits.enter(who)
    try:
        async with limits.body(request, limit, timeout, who) as body:
            try:
                doc = await asyncio.to_thread(json.loads, body)
            except RecursionError:
                raise HTTPError(400, "body: JSON nested too deep") from None
            except (ValueError, UnicodeDecodeError):
                raise HTTPError(400, "body: not JSON") from None
    finally:
        limits.leave(who)
    if not isinstance(doc, dict):
        raise HTTPError(422, "body: not a JSON object")
    return doc


def training_router(
    root: Path, tenants: TenantStore, limits: ServiceLimits, held: Limits, body_timeout: float
) -> tuple[APIRouter, Callable[[Any], AbstractAsyncContextManager[None]]]:
    """The routes above over the store at ``root``, and the lifespan of their job supervisor, which the app's
    own lifespan enters (FastAPI before 0.112.2 never ran a lifespan given to an included router: jobs stayed
    queued); every body must arrive within ``body_timeout`` seconds, as a predict body must, and a JSON one is
    held within the server's body budget (``held``; a shard streams to disk, counted by the quota)."""
    datasets = DatasetStore(root, limits.datasets)
    declaration_json = declaration_bytes(limits)
    jobs = Jobs(root, limits)

    running: dict[str, Supervisor] = {}  # the supervisor of the app's current lifespan

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        with sole_supervisor(root):
            datasets.sweep()
            await asyncio.to_thread(jobs.sweep)
            supervisor = running["supervisor"] = Supervisor(jobs, tenants)
            supervisor.start()
            yield
            await asyncio.to_thread(supervisor.stop)
            del running["supervisor"]

    def wake() -> None:
        if "supervisor" in running:
            running["supervisor"].wake()

    router = APIRouter(prefix="/v1", default_response_class=StrictJSONResponse)  # a NaN loss

    async def tenant(request: Request) -> int:
        return (await bearer_tenant(request, tenants)).tenant_id

    @router.get("/datasets")
    async def list_datasets(request: Request) -> list[dict[str, Any]]:
        return [d.summary(classes=False) for d in await _call(datasets.list, await tenant(request))]

    @router.put("/datasets/{name}")
    async def declare(name: str, request: Request) -> dict[str, Any]:
        who = await bearer_tenant(request, tenants)
        doc = await _json(request, declaration_json, held, body_timeout, who)
        return (await _call(datasets.declare, who.tenant_id, name, doc.get("manifest"), doc.get("shards"))).summary()

    @router.get("/datasets/{name}")
    async def dataset(name: str, request: Request) -> dict[str, Any]:
        return (await _call(datasets.get, await tenant(request), name)).summary()

    @router.delete("/datasets/{name}")
    async def delete(name: str, request: Request) -> dict[str, Any]:
        tid = await tenant(request)
        await _call(datasets.delete, tid, name)
        return {"deleted": name}

    @router.put("/datasets/{name}/shards/{split}/{file}")
    async def shard(name: str, split: str, file: str, request: Request) -> dict[str, Any]:
        tid = await tenant(request)
        try:
            async with asyncio.timeout(body_timeout):  # a stalled client: its temporary file goes, 408
                await datasets.receive(tid, name, f"{split}/{file}", request.stream())
        except TimeoutError:
            raise HTTPError(408, f"the shard did not arrive within {body_timeout:g} s; send it again") from None
        except DatasetError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        except ClientDisconnect:
            raise HTTPError(499, "the client closed the connection") from None
        return {"stored": f"{split}/{file}"}

    @router.post("/jobs")
    async def submit(request: Request) -> dict[str, Any]:
        who = await bearer_tenant(request, tenants)
        tid = who.tenant_id
        doc = await _json(request, JOB_JSON, held, body_timeout, who)
        name = doc.get("dataset")
        if not isinstance(name, str):
            raise HTTPError(422, "dataset: the name of one of your datasets")
        found = await _call(datasets.get, tid, name)
        activate, processes = doc.get("activate", False), doc.get("processes", 1)
        submitted = await _call(jobs.submit, tid, found, doc.get("config"), activate, processes)
        wake()
        return submitted

    @router.get("/jobs")
    async def list_jobs(request: Request) -> list[dict[str, Any]]:
        return await _call(jobs.list, await tenant(request))

    @router.get("/jobs/{job_id}")
    async def job(job_id: str, request: Request) -> dict[str, Any]:
        return await _call(jobs.get, await tenant(request), job_id)

    @router.get("/jobs/{job_id}/metrics")
    async def metrics(job_id: str, request: Request) -> list[dict[str, Any]]:
        tid = await tenant(request)
        await _call(jobs.get, tid, job_id)  # 404 unless the tenant's
        return await _call(jobs.metrics, job_id)

    @router.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request) -> dict[str, Any]:
        cancelled = await _call(jobs.cancel, await tenant(request), job_id)
        wake()
        return cancelled

    @router.post("/jobs/{job_id}/activate")
    async def activate(job_id: str, request: Request) -> dict[str, Any]:
        return await _call(jobs.activate, await tenant(request), job_id, tenants)

    return router, lifespan
