"""``ppvit client``: its parsers and one library call per action (predict, and fine-tuning as a service)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ppvit._io import atomic_write_json, read_json
from ppvit.cli.common import add_strict_arg, positive, prediction_line, report_failed
from ppvit.crypto.keys import Key


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
        print(prediction_line(f, p.label, p.probability))
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
    a.add_argument(
        "--block-size", type=positive, help="the block size you trained with: refuse a server reporting another"
    )
    a.add_argument("--size", type=positive, help="the input size you trained with: refuse a server reporting another")
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
        earlier = read_json(marker)
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
    a.add_argument("--img-size", type=positive, help="input size (default: the key's pin, else 224)")
    a.add_argument("--scheme", help="encryption scheme (default: the key's pin, else shuffle)")
    a.add_argument("--block-size", type=positive, help="block size (default: the key's pin, else 16)")
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
