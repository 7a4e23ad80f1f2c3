"""Request decoding and answer encoding of ``POST /v1/predict`` and ``GET /v1/adapter``.

A body is one PNG, ``application/x-npy`` array(s) of shape (H, W, C) or (N, H, W, C), or
JSON ``{"images": [base64 PNG, ...]}``. The array's dtype is the adapter's ciphertext's (uint8; a
``mix`` adapter's float16, a ``lift`` adapter's int16 or int32, which PNG cannot carry). Dtype,
sizes and counts are checked from the ``.npy`` header or each PNG's header before anything is
decoded or allocated, a float array's values are finite; anything else is a 4xx
:class:`~ppvit.serve.auth.HTTPError`. Answers are JSON bytes (a request of several images' built off the
event loop, one image's on it: cheaper than the thread hop), and bounded
whatever the head: a prediction names its ``top_k`` classes (not a probability per class: a head of
thousands of long names made every answer hundreds of KB, and encoding it stalled the neighbours), and
``GET /v1/adapter``'s answer (every class name, up to ``MAX_CLASS_BYTES``) is encoded once per adapter
version and then served as those bytes, with an ETag.
Every answer of the server, predict's and every other route's (training ones included), is
strict JSON written by :func:`ppvit._io.json_text`: never Python's ``NaN`` or ``Infinity``,
which other parsers reject.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from ppvit._io import json_text
from ppvit.crypto.ciphers import Scheme
from ppvit.models.adapters import AdapterMeta
from ppvit.serve.auth import HTTPError
from ppvit.serve.cache import Served

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_HEADER_LIMIT = 1024  # bytes of a .npy header; a real one is under 128


@dataclass(frozen=True)
class Expected:
    """What the tenant's model takes: checked on headers, before anything is decoded or allocated."""

    side: int
    channels: int
    max_images: int
    dtypes: tuple[str, ...] = ("uint8",)  # of the ciphertext (:attr:`ppvit.crypto.ciphers.Scheme.ciphertext_dtypes`)

    @classmethod
    def of(cls, served: Served, max_images: int) -> Expected:
        """What ``served`` takes: its input size and channels, and its scheme's ciphertext dtypes."""
        scheme = served.meta.scheme
        dtypes = Scheme.parse(scheme).ciphertext_dtypes if scheme is not None else ("uint8",)
        return cls(served.base.routed.side, served.base.routed.in_channels, max_images, dtypes)

    def check(self, count: int, h: int, w: int, c: int) -> None:
        if count < 1:
            raise HTTPError(422, "no images in the request")
        if count > self.max_images:
            raise HTTPError(413, f"{count} images in one request; the limit is {self.max_images}")
        if c != self.channels:
            raise HTTPError(422, f"images have {c} channels; the model takes {self.channels}")
        if (h, w) != (self.side, self.side):
            raise HTTPError(422, f"images are {h}x{w}; the model takes {self.side}x{self.side} ciphertext")


def decode_images(body: bytes, content_type: str, expected: Expected) -> np.ndarray:
    """The request's images as (N, H, W, C) of the adapter's ciphertext dtype; HTTPError 4xx for anything else.

    Sizes and counts are checked from the ``.npy`` header or each PNG's header first, so a
    small body that declares a huge image is refused without allocating it.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("application/json", "image/png") and "uint8" not in expected.dtypes:
        raise HTTPError(415, f"this adapter takes {' or '.join(expected.dtypes)} ciphertext: send application/x-npy")
    if kind == "application/x-npy":
        images = _npy(body, expected)
    elif kind == "application/json":
        try:  # ValueError: a number over Python's digit limit; RecursionError: nesting too deep
            items = json.loads(body)["images"]
            if not isinstance(items, list):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise HTTPError(400, 'JSON body must be {"images": [base64 PNG, ...]}') from None
        if len(items) > expected.max_images:
            raise HTTPError(413, f"{len(items)} images in one request; the limit is {expected.max_images}")
        try:
            blobs = [base64.b64decode(s, validate=True) for s in items]
        except (binascii.Error, TypeError, ValueError):
            raise HTTPError(400, "JSON images must be base64 strings") from None
        images = np.stack([_png(b, i, expected) for i, b in enumerate(blobs)]) if blobs else None
    elif kind == "image/png":
        images = _png(body, 0, expected)[None]
    else:
        raise HTTPError(415, f"content type {kind or 'missing'}: send image/png, application/x-npy or application/json")
    if images is None or len(images) == 0:
        raise HTTPError(422, "no images in the request")
    return images


def _npy(body: bytes, expected: Expected) -> np.ndarray:
    buf = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf, max_header_size=NPY_HEADER_LIMIT)
    except (ValueError, OSError, EOFError, SyntaxError, RecursionError, MemoryError):
        raise HTTPError(400, "body is not a .npy array") from None
    if dtype.name not in expected.dtypes:
        raise HTTPError(422, f"array dtype is {dtype.name}; send {' or '.join(expected.dtypes)} ciphertext")
    if len(shape) not in (3, 4) or any(type(n) is not int or n < 0 for n in shape):
        raise HTTPError(422, f"array shape {shape}: expected (H, W, C) or (N, H, W, C)")
    shape4 = shape if len(shape) == 4 else (1, *shape)
    expected.check(*shape4)
    size = int(np.prod(shape)) * dtype.itemsize
    if len(body) - buf.tell() != size:
        raise HTTPError(400, f"array of shape {shape} {dtype.name} needs {size} bytes, the body holds another number")
    data = np.frombuffer(body, dtype=dtype, offset=buf.tell()).astype(dtype.name, copy=False)  # native byte order
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise HTTPError(422, "array holds values that are not finite")
    return data.reshape(shape4, order="F" if fortran else "C")


def _png(data: bytes, i: int, expected: Expected) -> np.ndarray:
    """One PNG, and only a PNG: no other PIL decoder is reached."""
    if not data.startswith(PNG_SIGNATURE):
        raise HTTPError(415, f"image {i} is not a PNG (the API takes PNG images only)")
    try:  # ValueError: a text or ICC chunk that inflates past PIL's limits
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            expected.check(1, im.height, im.width, len(im.getbands()))
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise HTTPError(400, f"image {i} is not a readable image") from None
    return arr[..., None] if arr.ndim == 2 else arr


def class_names(meta: AdapterMeta) -> list[str]:
    return meta.classes or [str(i) for i in range(meta.num_classes)]


def adapter_info(served: Served, max_images: int, max_body_bytes: int) -> dict[str, Any]:
    """What a tenant may know about its own adapter (never another's, never a key), and the limits of a
    predict request (images, body bytes) that its client packs requests within."""
    meta = served.meta
    return {
        "tenant": served.tenant.tenant,
        "version": served.tenant.version,
        "model": meta.model,
        "method": meta.method.get("method"),
        "input_size": served.base.routed.side,
        "preprocess": served.preprocess.to_json(),  # the client checks it resizes the same way
        "scheme": meta.scheme,
        "block_size": meta.block_size,
        "key_fingerprint": meta.key_fingerprint,
        "classes": class_names(meta),
        "max_images": max_images,
        "max_body_bytes": max_body_bytes,
    }


@dataclass(frozen=True)
class Encoded:
    """An answer encoded once: its JSON bytes and their strong ETag."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, doc: Any) -> Encoded:
        body = json_text(doc, indent=None).encode()
        return cls(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def matches(self, if_none_match: str | None) -> bool:
        """Whether a request's ``If-None-Match`` names this answer (then 304, no body)."""
        if not if_none_match:
            return False
        tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


def adapter_answer(served: Served, max_images: int, max_body_bytes: int) -> Encoded:
    """``GET /v1/adapter``'s answer, encoded on the first request for this adapter version and kept
    with it (an adapter of many long class names answers about half a MB: re-encoding it per
    request held the event loop for each). Call it off the event loop when not yet encoded."""
    answer = served.encoded.get("adapter")
    if answer is None:  # two threads may both encode it once: the same bytes
        answer = served.encoded["adapter"] = Encoded.of(adapter_info(served, max_images, max_body_bytes))
    return answer


class StrictJSONResponse(JSONResponse):
    """FastAPI's JSON answer through the project's one JSON writer (a NaN is ``null``, an infinity ``"inf"``)."""

    def render(self, content: Any) -> bytes:
        return json_text(content, indent=None).encode()


def top_classes(p: np.ndarray, k: int) -> list[int]:
    """The indices of the ``k`` largest values of the row ``p``, largest first, ties by the lower index.

    ``partition`` finds the k-th value without sorting the whole row (a head of thousands of classes),
    then only the candidates at or above it are ordered (``argpartition`` alone leaves ties in no set order)."""
    k = min(k, len(p))
    kth = -np.partition(-p, k - 1)[k - 1]
    candidates = np.flatnonzero(p >= kth)
    return candidates[np.lexsort((candidates, -p[candidates]))[:k]].tolist()


def answers_json(served: Served, rows: list[torch.Tensor], logits: bool, top_k: int) -> bytes:
    """The predict answer as JSON bytes: per image its label (the top class), index and probability,
    and its ``top_k`` most probable classes in descending order (ties by index), each with its logit
    when asked. Its size depends on ``top_k`` and the images, not on the head's class count.

    The rows (one adapter's: one width) are read as one NumPy matrix: a few operations for the whole
    request (a dozen tensor operations per image cost 10 us each). Logits that are not finite (an adapter
    whose weights overflow on this input; registration refuses those that do on a probe image) are
    refused (422) rather than answered with NaNs."""
    names = served.meta.classes  # None: a class is named by its index (not a list built per answer)
    table = torch.stack(rows).float().cpu().numpy()
    finite = np.isfinite(table).all(1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise HTTPError(422, f"image {first}: the adapter's outputs for it are not finite (its weights overflow)")
    with np.errstate(over="ignore"):  # logits near float32's limit: their differences overflow to -inf, exp 0
        e = np.exp(table - table.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    k = min(top_k, p.shape[1])
    part = np.argpartition(-p, k - 1, axis=1)[:, :k]  # each row's k largest, in no set order
    values = np.take_along_axis(p, part, 1)
    ranked = np.take_along_axis(part, np.lexsort((part, -values), axis=-1), 1)
    for i in np.flatnonzero((p >= values.min(1, keepdims=True)).sum(1) > k):  # tied at the k-th value: exactly
        ranked[i] = top_classes(p[i], k)
    columns = {"index": ranked.tolist(), "probability": np.take_along_axis(p, ranked, 1).tolist()}
    if logits:
        columns["logit"] = np.take_along_axis(table, ranked, 1).tolist()
    answers = []
    for i in range(len(rows)):
        top = [
            {"label": names[c] if names else str(c), **{name: col[i][j] for name, col in columns.items()}}
            for j, c in enumerate(columns["index"][i])
        ]
        answers.append({**{n: top[0][n] for n in ("label", "index", "probability")}, "top": top})
    doc = {"tenant": served.tenant.tenant, "version": served.tenant.version, "predictions": answers}
    return json_text(doc, indent=None).encode()
