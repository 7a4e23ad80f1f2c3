"""What the server holds for its clients at once, every route alike: request body bytes in memory (all tenants,
503 beyond; one tenant at most the budget less one body, 429), a body's deadline (408) and size (413), and each
tenant's requests with bodies in flight (429).

A declaration or a job submission trickled in, or sixty of them held open a byte short, held memory the
budget never counted (hostile tester): every body, predict's and the service's, is read here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.requests import ClientDisconnect, Request

from ppvit.serve.auth import HTTPError
from ppvit.serve.tenants import TenantAdapter


class Limits:
    """Used from the event loop only: no lock. A tenant holds at most ``body_budget - max_body`` of the budget (at
    least one body): eight predict bodies of 32 MiB held open were the whole default budget, and every other
    tenant's request was answered 503 (third reader)."""

    def __init__(self, body_budget: int, per_tenant: int, max_body: int) -> None:
        self.body_budget, self.per_tenant = body_budget, per_tenant
        self.tenant_share = max(body_budget - max_body, max_body)
        self.body_bytes = 0
        self.in_flight: dict[int, int] = {}
        self.held: dict[int, int] = {}  # body bytes each tenant holds

    def enter(self, tenant: TenantAdapter) -> None:
        n = self.in_flight.get(tenant.tenant_id, 0)
        if n >= self.per_tenant:
            raise HTTPError(429, f"tenant {tenant.tenant}: {n} requests in flight; the limit is {self.per_tenant}")
        self.in_flight[tenant.tenant_id] = n + 1

    def leave(self, tenant: TenantAdapter) -> None:
        n = self.in_flight.pop(tenant.tenant_id) - 1
        if n:
            self.in_flight[tenant.tenant_id] = n

    def reserve(self, nbytes: int, tenant: TenantAdapter) -> None:
        mine = self.held.get(tenant.tenant_id, 0)
        if mine + nbytes > self.tenant_share:
            raise HTTPError(
                429, f"tenant {tenant.tenant}: {mine + nbytes} body bytes at once; the limit is {self.tenant_share}"
            )
        if self.body_bytes + nbytes > self.body_budget:
            raise HTTPError(503, "the server holds as many request bodies as it takes; retry shortly")
        self.body_bytes += nbytes
        self.held[tenant.tenant_id] = mine + nbytes

    def release(self, nbytes: int, tenant: TenantAdapter) -> None:
        self.body_bytes -= nbytes
        left = self.held.pop(tenant.tenant_id, 0) - nbytes
        if left:
            self.held[tenant.tenant_id] = left

    @asynccontextmanager
    async def body(self, request: Request, limit: int, timeout: float, tenant: TenantAdapter) -> AsyncIterator[bytes]:
        """The tenant's body, its bytes reserved from the budget until the block ends (see :func:`read_body`)."""
        held = [0]
        try:
            yield await read_body(request, limit, timeout, lambda n: self.reserve(n, tenant), held)
        finally:
            self.release(held[0], tenant)


async def read_body(
    request: Request, limit: int, timeout: float, reserve: Callable[[int], None], held: list[int]
) -> bytes:
    """The body within ``timeout`` seconds, refused with 413 as soon as it exceeds ``limit``
    (declared or streamed) and as ``reserve`` refuses more bytes held (the budget's 503, the tenant's 429);
    ``held[0]`` counts the bytes reserved (the caller gives them back)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body of {declared} bytes; the limit is {limit}")
    expected = int(declared) if declared is not None and declared.isdigit() else 0
    reserve(expected)
    held[0] = expected
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise HTTPError(413, f"body over {limit} bytes")
                if len(body) + len(chunk) > held[0]:  # sent without a length, or more than it declared
                    reserve(len(body) + len(chunk) - held[0])
                    held[0] = len(body) + len(chunk)
                body += chunk
    except TimeoutError:
        raise HTTPError(408, f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise HTTPError(499, "the client closed the connection") from None
    return bytes(body)
