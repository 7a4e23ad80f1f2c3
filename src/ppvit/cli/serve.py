"""``ppvit serve`` and ``ppvit client``: parsers and one library call each (the server's half of the CLI)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ppvit._io import atomic_write_bytes
from ppvit.crypto.keys import Key


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
        )
        print(f"ppvit serve: {args.root} on http://{args.host}:{args.port}", file=sys.stderr)
        serve(cfg, args.host, args.port)
    elif args.action == "add-tenant":
        token = TenantStore(args.dir).add(args.name, args.adapter, args.weights)
        _hand_over(token, args.token_file, args.name)
    elif args.action == "set-adapter":
        version = TenantStore(args.dir, create=False).set_adapter(args.name, args.adapter, args.weights)
        print(f"tenant {args.name}: adapter version {version} (requests in flight finish on the previous one)")
    elif args.action == "remove-tenant":
        TenantStore(args.dir, create=False).remove(args.name)
        print(f"tenant {args.name}: removed")
    else:
        for t in TenantStore(args.dir, create=False).list():
            print(f"{t.tenant}\tversion {t.version}\t{t.folder}")


def _hand_over(token: str, token_file: str | None, name: str) -> None:
    """Show the token once, or write it to a new 0600 file (never over an existing one)."""
    if token_file is None:
        print(f"tenant {name} added. Its API token (shown once, only its hash is kept):\n{token}")
        return
    if os.path.lexists(token_file):
        raise ValueError(f"token file {token_file}: exists; choose a new name")
    atomic_write_bytes(token_file, (token + "\n").encode(), mode=0o600)
    print(f"tenant {name} added; token written to {token_file} (mode 0600)")


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
        if name == "add-tenant":
            a.add_argument("--token-file", help="write the token to this new file (0600) instead of printing it")
    a = actions.add_parser("remove-tenant", help="remove a tenant and its adapters")
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
    with Client(args.server, token, scheme=args.scheme) as client:
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
    p.set_defaults(func=_client)
