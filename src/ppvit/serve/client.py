"""The client side of ``ppvit serve``: encrypt locally, send ciphertext only, read the answers.

The client asks the server which scheme, block size, input size and key fingerprint its
adapter was trained with, refuses a key whose fingerprint differs, resizes and encrypts
each image here (as ``ppvit predict`` does), and sends the uint8 ciphertext as a ``.npy``
body. Neither the key nor a plain image leaves this process.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from ppvit.crypto.ciphers import BlockCipher, Scheme
from ppvit.crypto.keys import Key
from ppvit.data.images import read_image


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    probabilities: list[float]
    logits: list[float] | None = None
    version: int | None = None  # the adapter version that answered


class ServerError(RuntimeError):
    """The server's one-line answer to a refused request, with its status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
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
    ):
        """``scheme``: the scheme you trained with; the server's word for it is then checked,
        not trusted (the key's fingerprint binds the key, not the scheme or block size)."""
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout, transport=transport
        )
        self.scheme = None if scheme is None else str(Scheme.parse(scheme))
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
            raise ServerError(0, f"{self.http.base_url}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ServerError(response.status_code, message)
        return response.json()

    def info(self) -> dict[str, Any]:
        """The tenant's adapter settings as the server states them (cached)."""
        if self._info is None:
            self._info = self._call("GET", "/v1/adapter")
        return self._info

    def encrypt(self, images: list[str | os.PathLike | np.ndarray], key: Key | None, plain: bool = False) -> np.ndarray:
        """Plain images (files or HWC uint8 arrays) -> the (N, S, S, 3) uint8 ciphertext the adapter expects.

        The server says which scheme its adapter takes; a server that says "none" gets plain
        images only when the caller asks for that (``plain=True``) and gave no key.
        """
        info = self.info()
        if self.scheme is not None and info["scheme"] != self.scheme:
            raise ValueError(f"the server says the adapter takes scheme {info['scheme']}, not {self.scheme}: refusing")
        if info["scheme"] is None and (key is not None or not plain):
            raise ValueError(
                "the server says this adapter takes plain images; refusing to send them unencrypted "
                "(pass no key and plain=True / --plain if that is what you want)"
            )
        size = info["input_size"]
        arrays = []
        for im in images:
            if isinstance(im, np.ndarray):
                if im.shape != (size, size, 3) or im.dtype != np.uint8:
                    raise ValueError(f"array image of shape {im.shape} {im.dtype}: need ({size}, {size}, 3) uint8")
                arrays.append(im)
            else:
                arrays.append(read_image(im, size))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if info["scheme"] is not None:
            if key is None:
                raise ValueError(f"the adapter expects images encrypted with scheme {info['scheme']}: pass the key")
            if key.fingerprint != info["key_fingerprint"]:
                raise ValueError(
                    f"key fingerprint {key.fingerprint} is not the one the adapter was trained with "
                    f"({info['key_fingerprint']})"
                )
            x = BlockCipher(key, info["scheme"], info["block_size"]).encrypt(x)
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    def predict_ciphertext(self, ciphertext: np.ndarray, logits: bool = False) -> list[Prediction]:
        """Send (N, S, S, 3) uint8 ciphertext; one prediction per image."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(ciphertext, dtype=np.uint8), allow_pickle=False)
        answer = self._call(
            "POST",
            "/v1/predict",
            content=buf.getvalue(),
            headers={"Content-Type": "application/x-npy"},
            params={"logits": "true"} if logits else None,
        )
        return [
            Prediction(p["label"], p["probability"], p["probabilities"], p.get("logits"), answer.get("version"))
            for p in answer["predictions"]
        ]

    def predict(
        self, images: list[str | os.PathLike | np.ndarray], key: Key | None, logits: bool = False, plain: bool = False
    ) -> list[Prediction]:
        """Encrypt here, send ciphertext (in requests of at most the server's limit), return the answers in order.

        An answer from a newer adapter version than the settings used to encrypt (the tenant's
        adapter was replaced meanwhile) is not returned: settings are read again and the images resent.
        """
        for _ in range(2):
            info = self.info()
            ciphertext = self.encrypt(images, key, plain)
            step = info.get("max_images") or len(ciphertext)
            answers: list[Prediction] = []
            for start in range(0, len(ciphertext), step):
                answers += self.predict_ciphertext(ciphertext[start : start + step], logits)
            if all(a.version == info["version"] for a in answers):
                return answers
            self._info = None
        raise ServerError(409, "the tenant's adapter changed twice while predicting; try again")
