"""How ``ppvit serve`` runs the app of :mod:`ppvit.serve.app`: uvicorn with a connection guard, the listening
socket bound before anything loads, TLS files checked, and a warning for a server exposed without TLS."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable

from ppvit.serve.app import ServeConfig, create_app

log = logging.getLogger(__name__)


def guarded_protocol(max_connections: int, header_timeout: float, max_per_client: int | None = None) -> type:
    """uvicorn's h11 protocol with a cap on open connections, all clients together and per client
    address (``max_per_client``: one client holding every slot would starve ``/healthz`` and
    everyone else; one past either cap is closed at once), and a deadline for each request's
    headers, from the connection's opening or the request's first byte (uvicorn's keep-alive
    timeout covers only the idle time after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_client: dict[str, int] = {}  # open connections by client address (all protocol instances: one loop)

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        address: str | None = None  # counted in per_client while open

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
            if len(self.connections) > max_connections or per_client.get(address, 0) >= (
                max_per_client or max_connections
            ):
                transport.abort()
                return
            self.address = address
            per_client[address] = per_client.get(address, 0) + 1
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # bytes of a request whose headers are not all in yet
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self.address is not None:
                left = per_client.pop(self.address) - 1
                if left:
                    per_client[self.address] = left
                self.address = None
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
        http=guarded_protocol(cfg.max_connections, cfg.header_timeout_s, cfg.max_client_connections),
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


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before anything loads: a port in use is one line of ours (uvicorn,
    binding it itself after the app's start, logged its own and exited 3, a second server on the port having run
    its lifespan, the job supervisor's restart of the first one's jobs included). Listening at once: two sockets
    with ``SO_REUSEADDR`` both bind a port that neither listens on yet. Connections made while the app loads wait
    in the backlog: a readiness probe asks ``/healthz``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn's own bind_socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"{host}:{port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def serve(
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    listening_at: Callable[[str], None] | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM; requests in flight are answered before it exits. ``listening_at`` is
    told the server's URL once its port is bound (the port chosen where ``port`` is 0)."""
    import uvicorn

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (ssl_certfile, ssl_keyfile):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"TLS file {path}: not found")
    warning = exposure_warning(host, ssl_certfile is not None)
    if warning:
        log.warning("%s", warning)
    with listen(host, port) as listening:  # closed also where the app cannot be made (a damaged tenants.sqlite)
        if listening_at is not None:
            bound = f"[{host}]" if ":" in host else host
            listening_at(f"{'https' if ssl_certfile else 'http'}://{bound}:{listening.getsockname()[1]}")
        config = uvicorn_config(cfg, host, port, ssl_certfile, ssl_keyfile)
        app = config.app
        # uvicorn logs a failed start or stop of the app as a traceback: the failure is said once, below
        uvicorn_log = logging.getLogger("uvicorn.error")

        def quiet(record: logging.LogRecord) -> bool:
            return not hasattr(app.state, "failure")

        uvicorn_log.addFilter(quiet)
        try:
            uvicorn.Server(config).run(sockets=[listening])
        except SystemExit:
            if not hasattr(app.state, "failure"):
                raise
        finally:
            uvicorn_log.removeFilter(quiet)
        failure = getattr(app.state, "failure", None)
        if failure is not None:
            raise ValueError(f"{cfg.root}: the server stopped on an error: {failure}") from failure
