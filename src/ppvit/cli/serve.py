"""``ppvit serve`` and ``ppvit client``: parsers and one library call each (the server's half of the CLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ppvit._io import atomic_write_bytes, atomic_write_json
from ppvit.cli.common import add_strict_arg, report_failed
from ppvit.crypto.keys import Key
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
    )


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
    p.add_argument("--tenant-requests", type=int, default=8, help="a tenant's predict requests in flight (8; 429)")
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


def _token(path: str) -> str:
    """The one token a token file holds; never echoed (a second line went out in a header, and httpx's error
    about that header printed the whole token)."""
    from ppvit.serve.client import TOKEN

    try:
        token = Path(path).read_bytes().strip().decode("ascii", "replace")
    except OSError as exc:
        raise ValueError(f"token file {path}: cannot be read ({exc.strerror})") from None
    if not TOKEN.fullmatch(token):
        raise ValueError(f"token file {path}: not one token (one line of printable ASCII, no spaces)")
    return token


@contextmanager
def _server_errors(url: str) -> Iterator[None]:
    """A refusal from the server, or no server at all, as one user-error line (exit 2), not a traceback."""
    import httpx

    from ppvit.serve.client import ServerError

    try:
        yield
    except ServerError as exc:
        raise ValueError(str(exc)) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ValueError(f"server {url}: {exc or type(exc).__name__}") from None
    except (KeyError, TypeError) as exc:  # JSON without a ppvit server's fields: another service at that URL
        raise ValueError(
            f"server {url}: an answer without a ppvit server's fields ({exc!r}); not a ppvit server?"
        ) from None


def _client(args: argparse.Namespace) -> int:
    from ppvit.data.images import image_files
    from ppvit.serve.client import Client

    token = _token(args.token_file)
    key = Key.load(args.key) if args.key else None
    failed: list[tuple[str, str]] | None = None if args.strict else []
    with (
        _server_errors(args.server),
        Client(args.server, token, scheme=args.scheme, block_size=args.block_size, input_size=args.size) as client,
    ):
        images = list(image_files(args.images))  # a folder: the image files under it, as `ppvit predict`
        answers = client.predict(images, key, plain=args.plain, top_k=1, failed=failed)
    bad = {f for f, _ in failed or []}
    for f, p in zip([f for f in images if f not in bad], answers, strict=True):
        print(f"{f}\t{p.label}\t{p.probability:.3f}")
    return report_failed(failed or [], "the others were classified")


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="query a ppvit server: encrypt locally, send ciphertext only")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("predict", help="classify image files through the server")
    a.add_argument(
        "images", nargs="+", help="image files: plain ones are resized and encrypted here, ppvit ciphertext sent as is"
    )
    a.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    a.add_argument("--token-file", required=True, help="file holding the tenant's API token")
    a.add_argument("--key", help="the key file the adapter was trained with (stays here)")
    a.add_argument("--plain", action="store_true", help="send plain images (only to an adapter trained on them)")
    a.add_argument("--scheme", help="the scheme you trained with: refuse a server that reports another")
    a.add_argument("--block-size", type=int, help="the block size you trained with: refuse a server reporting another")
    a.add_argument("--size", type=int, help="the input size you trained with: refuse a server reporting another")
    add_strict_arg(a)
    p.set_defaults(func=_client)
    add_service_verbs(actions)


# -- fine-tuning as a service: train, upload, jobs, job, cancel, activate --------------------------------


def _job_line(job: dict) -> str:
    acc = "-" if job["val_acc"] is None else f"{job['val_acc']:.3f}"
    version = f"\tversion {job['version']}" if job["version"] is not None else ""
    error = f"\t{job['error']}" if job["error"] else ""
    progress = f"epoch {job['epoch']}/{job['epochs']}\tval acc {acc}"
    return f"{job['id']}\t{job['state']}\t{job['dataset']}\t{progress}{version}{error}"


def _settings(pairs: list[str]) -> dict:
    """``--set NAME=VALUE`` pairs; a value is JSON where it parses (3e-3, true, null), else the text ("no")."""
    import json

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair}: use NAME=VALUE (a `ppvit train` setting)")
        try:
            out[name.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[name.replace("-", "_")] = value
    return out


def _progress(job: dict) -> str:
    """The job's state, with its figures once it has some (none while queued or in its first epoch)."""
    figures = []
    if job["train_loss"] is not None:
        figures.append(f"loss {job['train_loss']:.3f}")
    if job["val_acc"] is not None:
        figures.append(f"val acc {job['val_acc']:.3f}")
    return " ".join([job["state"], *figures])


def _follow(client, job: dict) -> dict:
    """A progress bar over the job's epochs until it ends (loss, val acc, ETA; the log's last line)."""
    from tqdm.auto import tqdm

    with tqdm(total=job["epochs"], desc=job["id"], unit="epoch") as bar:

        def update(j: dict) -> None:
            bar.update(j["epoch"] - bar.n)
            bar.set_postfix_str(_progress(j))

        return client.follow(job["id"], update)


def _service(args: argparse.Namespace) -> None:
    from ppvit.serve.client import Client

    with _server_errors(args.server), Client(args.server, _token(args.token_file)) as client:
        _service_call(client, args)


def _service_call(client, args: argparse.Namespace) -> None:
    from ppvit.serve.client import warn_threat_model

    if args.action == "jobs":
        for job in client.jobs():
            print(_job_line(job))
        return
    if args.action == "datasets":
        for found in client.datasets():
            state = "complete" if found["complete"] else f"{len(found['missing'])} shards missing"
            print(f"{found['name']}\t{found['bytes']} bytes\t{state}\tkey fingerprint {found['key_fingerprint']}")
        return
    if args.action == "delete":
        print(f"dataset {client.delete_dataset(args.dataset)['deleted']} deleted")
        return
    if args.action in ("job", "cancel", "activate"):
        job = {"job": client.job, "cancel": client.cancel, "activate": client.activate}[args.action](args.job)
        print(_job_line(job))
        return
    warn_threat_model()
    if args.action == "upload":
        found = client.upload(args.folder, args.name, lambda rel: print(f"sent {rel}", file=sys.stderr))
        print(f"dataset {found['name']}: {found['bytes']} bytes, key fingerprint {found['key_fingerprint']}")
        return
    job = _train_remote(client, args)
    if job["state"] != "succeeded":
        print(_job_line(job))
        raise ValueError(f"job {job['id']} {job['state']}: {job['error'] or 'see ppvit client job'}")
    print(_trained(client, job, args))


def _trained(client, job: dict, args: argparse.Namespace) -> str:
    """What a finished job gave: the server's test accuracy, and whether its version is served (if not,
    the command that serves it)."""
    lines = [f"{job['id']}\tsucceeded\t{job['dataset']}\tepoch {job['epoch']}/{job['epochs']}"]
    if job.get("test_acc") is not None:
        lines.append(f"test accuracy {job['test_acc']:.3f} on {job['test_images']} images (the server's test split)")
    served = client.info()["version"]
    if served == job["version"]:
        lines.append(f"adapter version {job['version']} is served")
    else:
        lines.append(
            f"adapter version {job['version']} is trained but not served (version {served} still is); serve it with: "
            f"ppvit client activate {job['id']} --server {args.server} --token-file {args.token_file}"
        )
    return "\n".join(lines)


def _train_remote(client, args: argparse.Namespace) -> dict:
    """encrypt here (resumable) -> upload (only missing shards) -> submit -> follow."""
    from ppvit.crypto.ciphers import pinned_cipher
    from ppvit.data.encrypt import encrypt_collection
    from ppvit.serve.client import ServerError, check_name

    key = Key.load(args.key)
    src = Path(args.src)
    name = args.name if args.name is not None else src.name.split(".")[0]
    check_name(name)  # before encrypting a whole dataset for a name the server refuses
    work = Path(args.work or f"{name}.ppvit-wds")
    cipher, size = pinned_cipher(key, args.scheme, args.block_size, args.img_size)
    if cipher.scheme.mixing:  # the service's datasets are wds shards of 8-bit images
        raise ValueError(
            f"scheme {cipher.scheme}: the service trains on uint8 shards and {cipher.scheme}'s ciphertext is not "
            "uint8; train it where the data are: ppvit encrypt --format npz, then ppvit train --data ENCRYPTED"
        )
    summary = encrypt_collection(src, work, cipher, size or 224, "wds", shard_size=args.shard_size)
    if summary.failed:
        raise ValueError(f"{src}: {len(summary.failed)} images could not be encrypted (first: {summary.failed[0]})")
    client.upload(work, name, lambda rel: print(f"sent {rel}", file=sys.stderr))
    settings = {"method": args.method, "model": args.model, "epochs": args.epochs, **_settings(args.set or [])}
    submitted = {"server": args.server, "dataset": name, "settings": settings}
    submitted.update(activate=args.activate, processes=args.processes)
    job = _submitted_before(client, work / JOB_MARKER, submitted)
    if job is not None:  # this command run again after an interruption: its job goes on, not a second one
        print(f"job {job['id']} on dataset {name} is already {job['state']}: following it", file=sys.stderr)
    else:
        job = client.submit(name, settings, activate=args.activate, processes=args.processes)
        atomic_write_json(work / JOB_MARKER, {"job": job["id"], "submitted": submitted})
        print(f"job {job['id']} submitted on dataset {name}", file=sys.stderr)
    try:
        return _follow(client, job)
    except (KeyboardInterrupt, ServerError):
        print(
            f"job {job['id']} goes on on the server: ppvit client job {job['id']} --server {args.server} "
            f"--token-file {args.token_file}",
            file=sys.stderr,
        )
        raise


JOB_MARKER = ".ppvit-job.json"  # in client train's --work: the job it submitted, and with what


def _submitted_before(client, marker: Path, submitted: dict) -> dict | None:
    """The job the same ``client train`` command submitted from this work folder, while it is queued or running
    (None: there is none, it ended, or the command differs: a new job is submitted)."""
    from ppvit.serve.client import FINAL_STATES, ServerError

    try:
        earlier = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(earlier, dict)
        or earlier.get("submitted") != submitted
        or not isinstance(earlier.get("job"), str)
    ):
        return None
    try:
        job = client.job(earlier["job"])
    except (ServerError, ValueError):  # gone from the server (404), or not a job id
        return None
    return None if job["state"] in FINAL_STATES else job


def add_service_verbs(actions: argparse._SubParsersAction) -> None:
    def connection(a: argparse.ArgumentParser) -> None:
        a.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
        a.add_argument("--token-file", required=True, help="file holding the tenant's API token")
        a.set_defaults(func=_service)

    a = actions.add_parser("train", help="encrypt a dataset here, upload it, fine-tune on the server, follow the job")
    a.add_argument("src", help="plain dataset (an ImageFolder with train/ and test/, or any `ppvit encrypt` source)")
    a.add_argument("--key", required=True, help="key file (stays here; only its fingerprint is sent)")
    a.add_argument("--name", help="dataset name on the server (default: SRC's name)")
    a.add_argument("--work", help="local folder of the encrypted shards (default NAME.ppvit-wds; resumable)")
    a.add_argument("--method", default="lora-pe", help="lora-pe, melo or linear (default lora-pe)")
    a.add_argument("--model", help="base model, one the server offers (default: its only one, if it offers one)")
    a.add_argument("--img-size", type=int, help="input size (default: the key's pin, else 224)")
    a.add_argument("--scheme", help="encryption scheme (default: the key's pin, else shuffle)")
    a.add_argument("--block-size", type=int, help="block size (default: the key's pin, else 16)")
    a.add_argument("--shard-size", type=int, help="images per shard (default 1000)")
    a.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    a.add_argument("--set", action="append", metavar="NAME=VALUE", help="any other `ppvit train` setting")
    a.add_argument("--activate", action="store_true", help="serve the new adapter version as soon as it is trained")
    a.add_argument("--processes", type=int, default=1, help="training processes on the server (default 1)")
    connection(a)
    a = actions.add_parser("upload", help="upload `ppvit encrypt --format wds` output (only missing shards)")
    a.add_argument("folder")
    a.add_argument("--name", required=True, help="dataset name on the server")
    connection(a)
    connection(actions.add_parser("jobs", help="this tenant's training jobs"))
    connection(actions.add_parser("datasets", help="this tenant's datasets on the server"))
    a = actions.add_parser("delete", help="delete one of this tenant's datasets on the server")
    a.add_argument("dataset", help="dataset name (as ppvit client datasets lists)")
    connection(a)
    for verb, text in (
        ("job", "one job's state and progress"),
        ("cancel", "stop a queued or running job"),
        ("activate", "serve the adapter version a finished job registered"),
    ):
        a = actions.add_parser(verb, help=text)
        a.add_argument("job", help="job id (job-...)")
        connection(a)
