"""The bodies of a client's predict requests: ``.npy`` ciphertext within the server's published limits (images a
request, encoded body bytes). Torch-free: the client encrypts and packs on a machine without it."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np


def npy_body(ciphertext: np.ndarray) -> bytes:
    """The ``.npy`` body of a predict request: what the server's ``max_body_bytes`` counts."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(ciphertext), allow_pickle=False)
    return buf.getvalue()


def request_bodies(ciphertext: np.ndarray, max_images: int | None, max_body_bytes: int | None) -> Iterator[bytes]:
    """(N, S, S, 3) ciphertext as the bodies of consecutive requests, in order, each of as many images as
    both limits allow (None: no limit). A body is measured as encoded, never estimated: a ``lift``
    ciphertext (int32 at worst) of the server's image count can be over its body limit."""
    start, total = 0, len(ciphertext)
    while start < total:
        n = min(max_images or total, total - start)
        body = npy_body(ciphertext[start : start + n])
        while max_body_bytes is not None and len(body) > max_body_bytes:
            if n == 1:
                raise ValueError(
                    f"one image's body is {len(body):,} bytes; the server takes at most {max_body_bytes:,}"
                )
            excess = -(-(len(body) - max_body_bytes) // ciphertext[0].nbytes)  # images to leave for the next
            n = max(1, n - excess)
            body = npy_body(ciphertext[start : start + n])
        yield body
        start += n
