"""Who is asking: the one bearer token -> tenant check of every route (predict, adapter, training).

A request carries exactly one ``Authorization: Bearer TOKEN`` header; two are refused (400) rather
than one of them picked, whichever router the request reaches. The token's SHA-256 is looked up in
the tenant registry (:class:`~ppvit.serve.tenants.TenantStore`); a registry that cannot be read is
logged and answered 503, an unknown token 401. Errors are :class:`HTTPError`: a status code and one line.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request

from ppvit.serve.tenants import TenantAdapter, TenantStore

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """An answer with a status code and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def bearer_tenant(request: Request, store: TenantStore) -> TenantAdapter:
    """The tenant (and its active adapter version) whose token the request carries; named in the access log."""
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
    return tenant
