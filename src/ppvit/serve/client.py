"""The client side of ``ppvit serve``: encrypt locally, send ciphertext only, read the answers.

The client asks the server which scheme, block size, input size, key fingerprint and input
recipe (resize kernel, mean, std) its adapter was trained with, refuses a key whose
fingerprint differs or a recipe other than the one it follows, resizes and encrypts
each image here (as ``ppvit predict`` does), and sends the ciphertext as a ``.npy`` body: uint8,
or a ``mix``/``lift`` adapter's float16 / int16 (2 bytes a value; int32 for the few ``lift`` keys
whose bound needs it). Neither the key nor a plain image leaves this process. Requests are packed within
the limits the server publishes with its settings (images, and body bytes as encoded: int32 ciphertext
of the server's image count can be over its body limit).

The server's word on the geometry is checked, not trusted: a key file that pins one
(``ppvit keygen --scheme --block-size --size``), or the caller's ``scheme``, ``block_size``
and ``input_size``, must match what the server states, and without a pinned block size
none under :data:`MIN_BLOCK_SIZE` is used (a block of 1 pixel keeps every pixel's colour).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ppvit._io import file_chunks, file_sha256
from ppvit.crypto.ciphers import BlockCipher, Scheme
from ppvit.crypto.keys import Key
from ppvit.data.images import ciphertext_origin, read_ciphertext_array, read_image
from ppvit.data.manifest import read_manifest
from ppvit.data.preprocess import KERNEL, Preprocess
from ppvit.serve.bodies import npy_body, request_bodies
from ppvit.serve.defaults import NAME, NAME_RULE

MIN_BLOCK_SIZE = 4  # the smallest block size used without a pin
UNPINNED_STEPS = ("shuffle", "mix", "lift")  # without a pin, a scheme must hold one: it moves values within blocks
JOB_ID = re.compile(r"job-[0-9a-f]{1,64}")  # what the server names jobs (serve.jobs)
TOKEN = re.compile(r"[\x21-\x7e]+")  # an API token: printable ASCII, no spaces or line breaks
THREAT_WARNING = (
    "warning: the server holds your ciphertexts. docs/THREAT_MODEL.md measured that about 20 of them "
    "suffice to recover the key of these block schemes; the service is no stronger than the scheme"
)
FINAL_STATES = ("succeeded", "failed", "cancelled")
PREDICT_CHUNK = 256  # images read and encrypted at once by `predict` (a multiple of the server's request count)
_warned = False


def warn_threat_model() -> None:
    """Say once per process, on stderr, what the threat model measured (uploading ciphertext is the risk)."""
    global _warned
    if not _warned:
        print(THREAT_WARNING, file=sys.stderr)
        _warned = True


@dataclass(frozen=True)
class Ranked:
    """One of an answer's most probable classes (``logit`` only when asked for)."""

    label: str
    index: int
    probability: float
    logit: float | None = None


@dataclass(frozen=True)
class Prediction:
    label: str  # the most probable class
    probability: float
    top: list[Ranked]  # the server's top_k classes, most probable first
    version: int | None = None  # the adapter version that answered


class ServerError(RuntimeError):
    """The server's one-line answer to a refused request, with its status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}" if status else message)
        self.status = status


class Client:
    """A tenant's connection: ``Client(url, token).predict(files, key)``."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        scheme: str | None = None,
        block_size: int | None = None,
        input_size: int | None = None,
    ):
        """``scheme``, ``block_size``, ``input_size``: what you trained with, for a key file that
        pins no geometry; the server's word for them is then checked, not trusted."""
        if not TOKEN.fullmatch(token):  # else httpx's error about the header would print it
            raise ValueError("the API token: not one token (one line of printable ASCII, no spaces)")
        try:
            base = httpx.URL(url.rstrip("/"))
        except httpx.InvalidURL as exc:
            raise ValueError(f"server URL {url!r}: {exc}") from None
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"server URL {url!r}: not an http:// or https:// URL of a host")
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, transport=transport
        )
        self.wanted = {
            "scheme": None if scheme is None else str(Scheme.parse(scheme)),
            "block_size": block_size,
            "input_size": input_size,
        }
        self._info: dict[str, Any] | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerError(0, f"server {self.http.base_url}: no answer ({exc or type(exc).__name__})") from None
        if response.status_code != 200:
            try:
                message = str(response.json()["error"])
            except (ValueError, KeyError, TypeError):  # not ppvit's JSON: an HTML page of a proxy or another server
                message = f"{' '.join(response.text.split())[:200]} (not a ppvit server's answer)"
            raise ServerError(response.status_code, " ".join(message.split()))
        try:
            return response.json()
        except ValueError:
            raise ServerError(
                0, f"server {self.http.base_url}: answered {path} with no JSON (not a ppvit server?)"
            ) from None

    def info(self) -> dict[str, Any]:
        """The tenant's adapter settings as the server states them (cached)."""
        if self._info is None:
            self._info = self._call("GET", "/v1/adapter")
        return self._info

    def encrypt(
        self,
        images: list[str | os.PathLike | np.ndarray],
        key: Key | None,
        plain: bool = False,
        failed: list[tuple[str, str]] | None = None,
    ) -> np.ndarray:
        """Images (files or HWC uint8 arrays) -> the (N, S, S, 3) ciphertext the adapter expects (uint8, or the
        float16 / integers of a ``mix``/``lift`` adapter).

        Plain images are encrypted here; a file that is ppvit ciphertext already (its marker, or its
        folder's manifest: :func:`~ppvit.data.images.ciphertext_origin`; a ``.npy`` array of the scheme's
        ciphertext dtype) is sent as it is when it records the adapter's key fingerprint and geometry (a
        ``.npy`` records none), and refused (naming it) otherwise. The server says which
        scheme its adapter takes; a server that says "none" gets plain images only when the caller asks
        for that (``plain=True``) and gave no key. ``failed``: a file that cannot be used is appended
        as (file, problem) and left out (the answers are then for the others, in order); without a
        list the first one raises.
        """
        arrays = self._encrypt(images, key, plain, failed)
        if arrays is None:
            raise _none_used(len(images), failed)
        return arrays

    def _encrypt(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        key: Key | None,
        plain: bool,
        failed: list[tuple[str, str]] | None,
    ) -> np.ndarray | None:
        """:meth:`encrypt`, None when no image could be used."""
        info = self.info()
        self.check_geometry(info, key)
        if info["scheme"] is None and (key is not None or not plain):
            raise ValueError(
                "the server says this adapter takes plain images; refusing to send them unencrypted "
                "(pass no key and plain=True / --plain if that is what you want)"
            )
        size = info["input_size"]
        self.check_preprocess(info)
        arrays, here = [], []  # here: encrypted by this client (plain images)
        dtypes = Scheme.parse(info["scheme"]).ciphertext_dtypes if info["scheme"] is not None else ("uint8",)
        for im in images:
            if isinstance(im, np.ndarray):
                if im.shape != (size, size, 3) or im.dtype != np.uint8:
                    raise ValueError(f"array image of shape {im.shape} {im.dtype}: need ({size}, {size}, 3) uint8")
                arrays.append(im)
                here.append(True)
                continue
            try:
                array, encrypt_here = self._read_file(im, info, dtypes)
            except ValueError as exc:
                if failed is None:
                    raise
                failed.append((str(im), str(exc).removeprefix(f"image {im}: ")))
                continue
            arrays.append(array)
            here.append(encrypt_here)
        if not arrays:
            return None
        if info["scheme"] is not None and any(here):
            if key is None:
                raise ValueError(f"the adapter expects images encrypted with scheme {info['scheme']}: pass the key")
            if key.fingerprint != info["key_fingerprint"]:
                raise ValueError(
                    f"key fingerprint {key.fingerprint} is not the one the adapter was trained with "
                    f"({info['key_fingerprint']})"
                )
            self.check_unpinned_scheme(info["scheme"], key)
            rows = [i for i, h in enumerate(here) if h]
            cipher = BlockCipher(key, info["scheme"], info["block_size"])
            for i, c in zip(rows, cipher.encrypt(np.stack([arrays[i] for i in rows])), strict=True):
                arrays[i] = c
        if len({a.dtype for a in arrays}) > 1:
            raise ValueError(f"ciphertext of several dtypes ({', '.join(sorted({a.dtype.name for a in arrays}))})")
        return np.stack(arrays)

    @staticmethod
    def _read_file(im: str | os.PathLike, info: dict[str, Any], dtypes: tuple[str, ...]) -> tuple[np.ndarray, bool]:
        """One image file as the array to send, and whether this client encrypts it (a plain image)."""
        size = info["input_size"]
        if str(im).lower().endswith(".npy"):
            if info["scheme"] is None:
                raise ValueError(f"image {im}: a .npy file is taken as ciphertext, but the adapter takes plain images")
            return read_ciphertext_array(im, size, dtypes), False
        origin = ciphertext_origin(im)
        if origin is not None:
            if info["scheme"] is None:
                raise ValueError(f"image {im}: ppvit ciphertext, but the adapter takes plain images")
            where = f"image {im}: ppvit ciphertext"
            origin.check(info["scheme"], info["block_size"], size, info["key_fingerprint"], where=where)
        return read_image(im, size, resize=origin is None), origin is None

    def pinned(self, key: Key | None) -> dict[str, Any]:
        """The geometry to hold the server to: the caller's settings, else the key file's pin (a setting the pin
        contradicts is refused, naming the key file)."""
        settled = {name: v if key is None else key.settle(name, v) for name, v in self.wanted.items()}
        return {name: v for name, v in settled.items() if v is not None}

    def check_geometry(self, info: dict[str, Any], key: Key | None) -> None:
        """Refuse a server that states other settings than the pinned ones, or (unpinned) too small a block."""
        stated = {"scheme": info.get("scheme"), "block_size": info.get("block_size"), "input_size": info["input_size"]}
        if stated["scheme"] is not None:
            stated["scheme"] = str(Scheme.parse(stated["scheme"]))
        pinned = self.pinned(key)
        for name, value in pinned.items():
            if stated[name] != value:
                raise ValueError(f"the server says the adapter takes {name} {stated[name]}, not {value}: refusing")
        block = stated["block_size"]
        if (
            stated["scheme"] is not None
            and "block_size" not in pinned
            and not (type(block) is int and block >= MIN_BLOCK_SIZE)
        ):
            raise ValueError(
                f"the server says the adapter takes block size {block}; refusing to encrypt with blocks under "
                f"{MIN_BLOCK_SIZE} pixels unless the key file or --block-size pins it"
            )

    def check_unpinned_scheme(self, scheme: str, key: Key) -> None:
        """Before this client encrypts: a scheme neither the key nor the caller pins must shuffle or mix within
        blocks, else a server could choose one that leaves images all but plain (negpos of 32-pixel blocks)."""
        if "scheme" in self.pinned(key) or any(step.name in UNPINNED_STEPS for step in Scheme.parse(scheme).steps):
            return
        raise ValueError(
            f"the server says the adapter takes scheme {scheme}; without a pin this client encrypts only with a "
            f"scheme that holds {', '.join(UNPINNED_STEPS)}: refusing (pass --scheme, or use a key pinned by "
            "ppvit keygen --scheme --block-size --size)"
        )

    @staticmethod
    def check_preprocess(info: dict[str, Any]) -> None:
        """Refuse an adapter whose input recipe is not what this client sends: images resized to the
        stated input size with ppvit's one kernel (mean and std are applied by the server). A server
        that states no recipe (an earlier release) is taken at its input size."""
        if info.get("preprocess") is None:
            return
        sent = Preprocess(info["input_size"], KERNEL, None, None)
        try:
            Preprocess.of(info["preprocess"], "the server's recipe").check(sent, "the adapter")
        except ValueError as exc:
            raise ValueError(f"{exc} (what this client sends): refusing") from None

    def predict_ciphertext(
        self, ciphertext: np.ndarray | bytes, logits: bool = False, top_k: int | None = None
    ) -> list[Prediction]:
        """Send (N, S, S, 3) ciphertext (uint8, or a ``mix``/``lift`` adapter's dtype; or its :func:`npy_body`)
        in one request; one prediction per image, naming its ``top_k`` classes (None: the server's default)."""
        body = ciphertext if isinstance(ciphertext, bytes) else npy_body(ciphertext)
        params = {"logits": "true"} if logits else {}
        if top_k is not None:
            params["top_k"] = str(top_k)
        answer = self._call(
            "POST",
            "/v1/predict",
            content=body,
            headers={"Content-Type": "application/x-npy"},
            params=params,
        )
        return [
            Prediction(
                p["label"],
                p["probability"],
                [Ranked(r["label"], r["index"], r["probability"], r.get("logit")) for r in p["top"]],
                answer.get("version"),
            )
            for p in answer["predictions"]
        ]

    def predict(
        self,
        images: list[str | os.PathLike | np.ndarray],
        key: Key | None,
        logits: bool = False,
        plain: bool = False,
        top_k: int | None = None,
        failed: list[tuple[str, str]] | None = None,
    ) -> list[Prediction]:
        """Encrypt here, send ciphertext (in requests within the server's limits: images and body bytes),
        return the answers in order (``failed``: as :meth:`encrypt`; an image whose body alone is over the
        server's limit is one of them).

        An answer from a newer adapter version than the settings used to encrypt (the tenant's
        adapter was replaced meanwhile) is not returned: settings are read again and the images resent.
        """
        for _ in range(2):
            info = self.info()
            if failed is not None:
                failed.clear()  # a second round reads the files again
            limit = info.get("max_body_bytes")  # None: a server that does not publish it (an earlier release)
            most = info.get("max_images")
            step = most * max(1, PREDICT_CHUNK // most) if most else PREDICT_CHUNK  # whole requests per chunk
            answers: list[Prediction] = []
            for start in range(0, len(images), step):  # a chunk at a time: a folder of photos is not held at once
                ciphertext = self._encrypt(images[start : start + step], key, plain, failed)
                if ciphertext is None:
                    continue
                alone = len(npy_body(ciphertext[:1]))
                if limit is not None and alone > limit:
                    return self._too_large(images, failed, alone, ciphertext.dtype.name, limit)
                for body in request_bodies(ciphertext, most, limit):
                    answers += self.predict_ciphertext(body, logits, top_k)
            if not answers:
                raise _none_used(len(images), failed)
            if all(a.version == info["version"] for a in answers):
                return answers
            self._info = None
        raise ServerError(409, "the tenant's adapter changed twice while predicting; try again")

    @staticmethod
    def _too_large(
        images: list[str | os.PathLike | np.ndarray],
        failed: list[tuple[str, str]] | None,
        alone: int,
        dtype: str,
        limit: int,
    ) -> list[Prediction]:
        """Every image whose ciphertext alone is a body over the server's ``limit`` named in ``failed`` (none
        is sent: all of one adapter's ciphertexts have one shape and dtype); without a list the first raises."""
        problem = (
            f"its ciphertext is a body of {alone:,} bytes ({dtype} .npy); the server takes at most {limit:,} bytes"
        )
        bad = {name for name, _ in failed or []}  # unreadable: named already
        names = [f"array image {i}" if isinstance(im, np.ndarray) else str(im) for i, im in enumerate(images)]
        for name in [n for n in names if n not in bad]:
            if failed is None:
                raise ValueError(f"image {name}: {problem}")
            failed.append((name, problem))
        return []

    # -- fine-tuning as a service (the server's ppvit.serve.training_api) ----------------------------

    def upload(self, folder: str | os.PathLike, name: str, on_shard: Callable[[str], None] | None = None) -> dict:
        """Upload ``ppvit encrypt --format wds`` output as dataset ``name``; only shards the server lacks are sent.

        The manifest (its key fingerprint, never the key) and each shard's size and SHA-256 are
        declared first; the server checks every shard against them. ``on_shard``: called per shard sent.
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        shards = sorted(p for p in folder.glob("*/shard-*.tar") if p.is_file())
        if not shards:
            raise ValueError(f"{folder}: no WebDataset shards (SPLIT/shard-NNNNNN.tar); encrypt with --format wds")
        specs = [
            {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in shards
        ]
        check_name(name)
        declared = self._call("PUT", f"/v1/datasets/{name}", json={"manifest": manifest.shared(), "shards": specs})
        missing = declared.get("missing") if isinstance(declared, dict) else None
        ours = {spec["path"] for spec in specs}
        if not isinstance(missing, list) or not all(isinstance(rel, str) and rel in ours for rel in missing):
            raise ServerError(0, f"server {self.http.base_url}: asked for files this client did not offer: refusing")
        for rel in missing:  # only shards declared above: a server cannot name another file here (a key)
            try:
                self._call("PUT", f"/v1/datasets/{name}/shards/{rel}", content=file_chunks(folder / rel))
            except ServerError as exc:
                if exc.status != 408:
                    raise
                raise ServerError(
                    408,
                    f"shard {rel} did not arrive within the server's body timeout; encrypt with a smaller "
                    "--shard-size into a new folder (ppvit encrypt --shard-size N, or client train --work)",
                ) from None
            if on_shard is not None:
                on_shard(rel)
        return self._call("GET", f"/v1/datasets/{name}")

    def datasets(self) -> list[dict]:
        return self._call("GET", "/v1/datasets")

    def submit(self, dataset: str, settings: dict[str, Any], activate: bool = False, processes: int = 1) -> dict:
        """A training job: flat ``ppvit train`` settings on one of this tenant's datasets, in ``processes``
        data-parallel processes (the global batch split between them; the server caps the number)."""
        doc = {"dataset": dataset, "config": settings, "activate": activate, "processes": processes}
        return self._call("POST", "/v1/jobs", json=doc)

    def jobs(self) -> list[dict]:
        return self._call("GET", "/v1/jobs")

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{checked_job(job_id)}")

    def job_metrics(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{checked_job(job_id)}/metrics")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{checked_job(job_id)}/cancel")

    def activate(self, job_id: str) -> dict:
        """Serve this tenant with the adapter version the job registered."""
        self._info = None
        return self._call("POST", f"/v1/jobs/{checked_job(job_id)}/activate")

    def delete_dataset(self, name: str) -> dict:
        check_name(name)
        return self._call("DELETE", f"/v1/datasets/{name}")

    def follow(self, job_id: str, on_update: Callable[[dict], None] | None = None, interval: float = 1.0) -> dict:
        """Poll the job until it ends; ``on_update`` sees each state. Returns the last one."""
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in FINAL_STATES:
                self._info = None  # the adapter may have changed
                return job
            time.sleep(interval)


def _none_used(n: int, failed: list[tuple[str, str]] | None) -> ValueError:
    """The error when no image could be sent, with the first reason (another key's ciphertext said nothing)."""
    first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
    return ValueError(f"none of the {n} images could be used{first}")


def check_name(name: str) -> None:
    """A dataset name as the server takes it, checked here: before encrypting a whole dataset for it, and
    never a name that reads as another URL (``x?y`` declared dataset ``x``)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"dataset name {name[:80]!r}: {NAME_RULE}; pass --name")


def checked_job(job_id: str) -> str:
    """A job id as the server writes them: never a path of another resource (``../adapter``)."""
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(
            f"job id {job_id[:80]!r}: not a job id (job- and hexadecimal digits, as ppvit client jobs lists)"
        )
    return job_id
