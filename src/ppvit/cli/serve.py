"""``ppvit serve`` and ``ppvit client``: parsers and one library call each (the server's half of the CLI)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ppvit._io import atomic_write_bytes
from ppvit.crypto.keys import Key
from ppvit.serve.defaults import KEEP_VERSIONS, MAX_CLASSES


def _serve(args: argparse.Namespace) -> None:
    from ppvit.serve.tenants import TenantStore

    if args.action is None:
        if args.root is None:
            raise ValueError("serve: --root DIR is needed (the folder of tenants.sqlite and the adapters)")
        try:
            from ppvit.serve.app import ServeConfig, serve
        except ImportError as exc:
            raise ValueError(f"the server needs FastAPI and uvicorn: pip install 'ppvit[serve]' ({exc.name})") from None
        cfg = ServeConfig(
            Path(args.root),
            window_ms=args.window_ms,
            max_batch=args.max_batch,
            max_images=args.max_images or min(64, args.max_batch),
            max_body_bytes=args.max_body_mb << 20,
            cache_bytes=args.cache_mb << 20,
            device=args.device,
            max_connections=args.max_connections,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            body_budget_bytes=max(args.body_budget_mb, args.max_body_mb) << 20,
            tenant_requests=args.tenant_requests,
            metrics=args.metrics,
            docs=args.docs,
        )
        scheme = "https" if args.ssl_certfile else "http"
        print(f"ppvit serve: {args.root} on {scheme}://{args.host}:{args.port}", file=sys.stderr)
        serve(cfg, args.host, args.port, args.ssl_certfile, args.ssl_keyfile)
    elif args.action == "add-tenant":
        token = TenantStore(args.dir).add(args.name, args.adapter, args.weights, max_classes=args.max_classes)
        _hand_over(token, args.token_file, args.name)
    elif args.action == "set-adapter":
        store = TenantStore(args.dir, create=False)
        version = store.set_adapter(args.name, args.adapter, args.weights, keep=args.keep, max_classes=args.max_classes)
        print(f"tenant {args.name}: adapter version {version} (requests in flight finish on the previous one)")
    elif args.action == "rotate-token":
        token = TenantStore(args.dir, create=False).rotate_token(args.name)
        _hand_over(token, args.token_file, args.name, "has a new token (the old one no longer works)")
    elif args.action == "remove-tenant":
        TenantStore(args.dir, create=False).remove(args.name)
        print(f"tenant {args.name}: removed")
    else:
        for t in TenantStore(args.dir, create=False).list():
            print(f"{t.tenant}\tversion {t.version}\t{t.folder}")


def _hand_over(token: str, token_file: str | None, name: str, what: str = "added") -> None:
    """Show the token once, or write it to a new 0600 file (never over an existing one)."""
    if token_file is None:
        print(f"tenant {name} {what}. Its API token (shown once, only its hash is kept):\n{token}")
        return
    if os.path.lexists(token_file):
        raise ValueError(f"token file {token_file}: exists; choose a new name")
    atomic_write_bytes(token_file, (token + "\n").encode(), mode=0o600)
    print(f"tenant {name} {what}; token written to {token_file} (mode 0600)")


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="multi-tenant encrypted inference server, and its tenants")
    p.add_argument("--root", help="server folder (tenants.sqlite, adapters); created on first start")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--window-ms", type=float, default=5.0, help="how long a batch waits for more requests (default 5 ms)"
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per routed forward (default 64)")
    p.add_argument("--max-images", type=int, help="images per request (default: 64 or --max-batch if smaller)")
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (default 32)")
    p.add_argument("--cache-mb", type=int, default=1024, help="adapter memory budget in MiB, LRU (default 1024)")
    p.add_argument("--device", default="cpu", help="torch device of the backbones and adapters (default cpu)")
    p.add_argument("--max-connections", type=int, default=1000, help="open connections; more are closed (1000)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send a request's headers (10)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a request's body (30)")
    p.add_argument(
        "--body-budget-mb", type=int, default=256, help="request bodies held in memory at once, MiB (256; 503 beyond)"
    )
    p.add_argument("--tenant-requests", type=int, default=8, help="a tenant's predict requests in flight (8; 429)")
    p.add_argument("--metrics", action="store_true", help="serve GET /metrics (every tenant's traffic; bind privately)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM) for HTTPS; or put a TLS reverse proxy in front")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM), with --ssl-certfile")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (
        ("add-tenant", "register a tenant with a run's adapter; prints its token once"),
        ("set-adapter", "give a tenant a new adapter version"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("dir", help="server folder")
        a.add_argument("name", help="tenant name")
        a.add_argument("--adapter", required=True, help="run folder or adapter folder (lora-pe, melo or linear)")
        a.add_argument("--weights", help="base weights file (default: the one the run's config.yaml names)")
        a.add_argument(
            "--max-classes", type=int, default=MAX_CLASSES, help=f"largest head accepted (default {MAX_CLASSES})"
        )
        if name == "add-tenant":
            a.add_argument("--token-file", help="write the token to this new file (0600) instead of printing it")
        else:
            a.add_argument(
                "--keep",
                type=int,
                default=KEEP_VERSIONS,
                help=f"adapter versions kept, the new one included; older ones are deleted (default {KEEP_VERSIONS})",
            )
    a = actions.add_parser("rotate-token", help="give a tenant a new API token; the old one stops working")
    a.add_argument("dir")
    a.add_argument("name")
    a.add_argument("--token-file", help="write the token to this new file (0600) instead of printing it")
    a = actions.add_parser("remove-tenant", help="remove a tenant, its token and every adapter version")
    a.add_argument("dir")
    a.add_argument("name")
    a = actions.add_parser("list-tenants", help="tenants and their adapter versions")
    a.add_argument("dir")
    p.set_defaults(func=_serve)


def _client(args: argparse.Namespace) -> None:
    from ppvit.serve.client import Client

    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise ValueError(f"token file {args.token_file}: cannot be read ({exc.strerror})") from None
    key = Key.load(args.key) if args.key else None
    with Client(args.server, token, scheme=args.scheme, block_size=args.block_size, input_size=args.size) as client:
        for f, p in zip(args.images, client.predict(args.images, key, plain=args.plain), strict=True):
            print(f"{f}\t{p.label}\t{p.probability:.3f}")


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="query a ppvit server: encrypt locally, send ciphertext only")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("predict", help="classify image files through the server")
    a.add_argument("images", nargs="+", help="plain image files (resized and encrypted here)")
    a.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    a.add_argument("--token-file", required=True, help="file holding the tenant's API token")
    a.add_argument("--key", help="the key file the adapter was trained with (stays here)")
    a.add_argument("--plain", action="store_true", help="send plain images (only to an adapter trained on them)")
    a.add_argument("--scheme", help="the scheme you trained with: refuse a server that reports another")
    a.add_argument("--block-size", type=int, help="the block size you trained with: refuse a server reporting another")
    a.add_argument("--size", type=int, help="the input size you trained with: refuse a server reporting another")
    p.set_defaults(func=_client)
