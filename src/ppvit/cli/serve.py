"""``ppvit serve``: its parser and one library call per action (the client's verbs: :mod:`ppvit.cli.client`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ppvit.serve.defaults import KEEP_VERSIONS, MAX_CLASSES


def _serve(args: argparse.Namespace) -> None:
    from ppvit.serve.tenants import TenantStore

    if args.action is None:
        if args.root is None:
            raise ValueError("serve: --root DIR is needed (the folder of tenants.sqlite and the adapters)")
        try:
            from ppvit.serve.app import ServeConfig
            from ppvit.serve.server import serve
        except ImportError as exc:
            raise ValueError(f"the server needs FastAPI and uvicorn: pip install 'ppvit[serve]' ({exc.name})") from None
        cfg = ServeConfig(
            Path(args.root),
            window_ms=args.window_ms,
            max_batch=args.max_batch,
            shared_pass_ms=args.shared_pass_ms,
            max_images=args.max_images or min(64, args.max_batch),
            top_k=args.top_k,
            max_top_k=args.max_top_k,
            max_body_bytes=args.max_body_mb << 20,
            cache_bytes=args.cache_mb << 20,
            slots=args.slots,
            slot_bytes=args.slot_mb << 20,
            cuda_graphs=args.cuda_graphs,
            device=args.device,
            max_connections=args.max_connections,
            max_client_connections=args.max_client_connections,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            body_budget_bytes=max(args.body_budget_mb, args.max_body_mb) << 20,
            tenant_requests=args.tenant_requests,
            metrics=args.metrics,
            docs=args.docs,
            training=_service_limits(args),
        )
        serve(
            cfg,
            args.host,
            args.port,
            args.ssl_certfile,
            args.ssl_keyfile,
            listening_at=lambda url: print(f"ppvit serve: {args.root} on {url}", file=sys.stderr),
        )
    elif args.action == "add-tenant":
        _hand_over(
            lambda token: TenantStore(args.dir).add(
                args.name, args.adapter, args.weights, max_classes=args.max_classes, token=token
            ),
            args.dir,
            args.token_file,
            args.name,
        )
    elif args.action == "set-adapter":
        store = TenantStore(args.dir, create=False)
        version = store.set_adapter(args.name, args.adapter, args.weights, keep=args.keep, max_classes=args.max_classes)
        print(f"tenant {args.name}: adapter version {version} (requests in flight finish on the previous one)")
    elif args.action == "rotate-token":
        _hand_over(
            lambda token: TenantStore(args.dir, create=False).rotate_token(args.name, token),
            args.dir,
            args.token_file,
            args.name,
            "has a new token (the old one no longer works)",
        )
    elif args.action == "remove-tenant":
        from ppvit.serve.supervisor import remove_tenant

        remove_tenant(args.dir, args.name)
        print(f"tenant {args.name}: removed, with its adapters, datasets and jobs")
    else:
        for t in TenantStore(args.dir, create=False).list():
            print(f"{t.tenant}\tversion {t.version}\t{t.folder}")


def _service_limits(args: argparse.Namespace):
    """The training service's limits from ``--train-model`` and friends (None: no training)."""
    if not args.train_model:
        return None
    from ppvit.serve.jobs import ServiceLimits

    models: dict[str, str | None] = {}
    for spec in args.train_model:
        name, _, weights = spec.partition("=")
        if weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"--train-model {spec}: weights file {weights} not found")
        models[name] = str(Path(weights).resolve()) if weights else None
    devices = [d.strip() for d in args.train_devices.split(",") if d.strip()]
    return ServiceLimits(
        models,
        args.max_epochs,
        args.max_steps,
        args.tenant_jobs,
        devices,
        args.max_job_processes,
        args.quota_mb << 20,
        args.ray_address,
        max_batch_size=args.max_job_batch,
        max_grad_accum=args.max_grad_accum,
        max_rank=args.max_rank,
        max_loader_workers=args.max_loader_workers,
        min_save_every_steps=args.min_save_every,
        max_dist_timeout_s=args.max_dist_timeout,
        max_datasets=args.max_datasets,
        max_shards=args.max_shards,
        max_classes=args.max_classes,
        max_img_size=args.max_img_size,
        jobs_kept=args.jobs_kept,
    )


def _hand_over(
    change: Callable[[str], object], root: str, token_file: str | None, name: str, what: str = "added"
) -> None:
    """Make the store ``change`` that registers a new token, showing it once or, into a new 0600 file, first.

    The file is made and written (never over an existing one) before the store changes, and removed if the change
    fails: a token that cannot be handed over (the file there, its folder missing, a full disk) must not leave a
    revoked token, or a tenant whose token nobody has, behind."""
    from ppvit.serve.tenants import new_token

    token = new_token()
    if token_file is None:
        change(token)
        print(f"tenant {name} {what}. Its API token (shown once, only its hash is kept):\n{token}")
        return
    try:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"token file {token_file}: exists; choose a new name") from None
    except OSError as exc:
        raise ValueError(f"token file {token_file}: cannot be created ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        os.unlink(token_file)
        raise ValueError(
            f"token file {token_file}: cannot be written ({exc.strerror or exc}); nothing changed"
        ) from None
    try:
        change(token)
    except BaseException:
        if not _registered(root, token):  # interrupted after the store took it: the file is its only copy
            os.unlink(token_file)
        raise
    print(f"tenant {name} {what}; token written to {token_file} (mode 0600)")


def _registered(root: str, token: str) -> bool:
    """Whether the store at ``root`` knows ``token`` (False where it cannot say: no store, a damaged one)."""
    from ppvit.serve.tenants import TenantStore

    try:
        return TenantStore(root, create=False).by_token(token) is not None
    except (ValueError, OSError):
        return False


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="multi-tenant encrypted inference server, and its tenants")
    p.add_argument("--root", help="server folder (tenants.sqlite, adapters); created on first start")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--window-ms", type=float, default=5.0, help="how long a batch waits for more requests (default 5 ms)"
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per routed forward (default 64)")
    p.add_argument(
        "--shared-pass-ms",
        type=float,
        default=20.0,
        help="while several tenants are active, a forward pass holds about this much per-image compute, shared "
        "among the waiting tenants, so that one tenant's large requests delay another's little (default 20 ms)",
    )
    p.add_argument("--max-images", type=int, help="images per request (default: 64 or --max-batch if smaller)")
    p.add_argument("--top-k", type=int, default=5, help="classes a prediction names unless it asks (default 5)")
    p.add_argument(
        "--max-top-k",
        type=int,
        default=20,
        help="the most classes a request may ask for (?top_k=, default 20): bounds an answer whatever the head",
    )
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (default 32)")
    p.add_argument("--cache-mb", type=int, default=1024, help="adapter memory budget in MiB, LRU (default 1024)")
    p.add_argument(
        "--slots",
        type=int,
        default=64,
        help="adapters each base keeps copied in its slot tables, which passes mixing tenants gather from (64)",
    )
    p.add_argument(
        "--slot-mb", type=int, default=256, help="and the most MiB of those tables a base keeps (one pass's own: more)"
    )
    p.add_argument("--device", default="cpu", help="torch device of the backbones and adapters (default cpu)")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each batch size's routed pass as a recorded CUDA graph (with --device cuda: one launch a pass)",
    )
    p.add_argument("--max-connections", type=int, default=1000, help="open connections; more are closed (1000)")
    p.add_argument(
        "--max-client-connections",
        type=int,
        default=100,
        help="open connections of one client address; more are closed (100): one client cannot take every slot",
    )
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send a request's headers (10)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a request's body (30)")
    p.add_argument(
        "--body-budget-mb", type=int, default=256, help="request bodies held in memory at once, MiB (256; 503 beyond)"
    )
    p.add_argument("--tenant-requests", type=int, default=8, help="a tenant's requests with bodies in flight (8; 429)")
    p.add_argument("--metrics", action="store_true", help="serve GET /metrics (every tenant's traffic; bind privately)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM) for HTTPS; or put a TLS reverse proxy in front")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM), with --ssl-certfile")
    _add_service_flags(p)
    _add_tenant_actions(p)
    p.set_defaults(func=_serve)


def _add_service_flags(p: argparse.ArgumentParser) -> None:
    """Fine-tuning as a service: its models, device slots and the limits of what a tenant may ask."""
    t = p.add_argument_group("fine-tuning as a service (on when --train-model is given)")
    t.add_argument(
        "--train-model",
        action="append",
        metavar="MODEL[=WEIGHTS]",
        help="a base model tenants may fine-tune, with its weights file (repeat for several)",
    )
    t.add_argument("--max-epochs", type=int, default=50, help="most epochs of a job (default 50)")
    t.add_argument("--max-steps", type=int, help="most optimiser steps of a job (default: no limit)")
    t.add_argument("--tenant-jobs", type=int, default=2, help="a tenant's queued or running jobs (default 2)")
    t.add_argument(
        "--train-devices", default="cpu", help="comma-separated device slots, one running job each (default cpu)"
    )
    t.add_argument(
        "--max-job-processes",
        type=int,
        default=1,
        help="most training processes of a job (torchrun; one CUDA slot each, or gloo on a cpu slot; default 1)",
    )
    t.add_argument("--quota-mb", type=int, default=10240, help="a tenant's uploaded bytes in MiB (default 10240)")
    for flag, default, text in (  # each job setting a tenant chooses that sizes the work: README's limits table
        ("--max-job-batch", 256, "largest batch_size of a job"),
        ("--max-grad-accum", 16, "largest grad_accum of a job"),
        ("--max-rank", 64, "largest LoRA rank of a job"),
        ("--max-loader-workers", 4, "most loader_workers of a job"),
        ("--min-save-every", 100, "smallest save_every_steps of a job"),
        ("--max-dist-timeout", 600, "largest dist_timeout_s of a job (seconds)"),
        ("--max-datasets", 20, "datasets of a tenant"),
        ("--max-shards", 10_000, "shards of a dataset"),
        ("--max-classes", MAX_CLASSES, "classes of a dataset's split"),
        ("--max-img-size", 512, "a dataset's input size in pixels"),
        ("--jobs-kept", 50, "finished jobs of a tenant kept, with their logs and metrics (older ones go)"),
    ):
        t.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    t.add_argument(
        "--ray-address",
        help="run jobs on a Ray cluster (its dashboard URL, e.g. http://head:8265; shared file system) instead of here",
    )


def _add_tenant_actions(p: argparse.ArgumentParser) -> None:
    """``serve ACTION DIR NAME``: the tenant registry, without a running server."""
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
    a = actions.add_parser(
        "remove-tenant", help="remove a tenant: token, adapter versions, datasets and jobs (running ones stopped first)"
    )
    a.add_argument("dir")
    a.add_argument("name")
    a = actions.add_parser("list-tenants", help="tenants and their adapter versions")
    a.add_argument("dir")
