"""`ppvit client predict` packs its requests within the server's body limit as well as its image count.

A ``lift`` ciphertext is int32 in the worst case (4 bytes a value): 64 images of 224x224, the server's
default count, made a 38 MiB body over its 32 MiB default limit, refused (413) instead of split. Here a
random (untrained) ``lift`` adapter on the micro ViT is served over real HTTP with a body limit of a few
images, and the server's side counts every ``POST /v1/predict`` and its bytes.
"""

from __future__ import annotations

import io
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import KEY, SMALL, run_cli
from PIL import Image
from serving import LiveServer, npy

from ppvit.crypto.ciphers import BlockCipher
from ppvit.models.adapters import AdapterMeta, save_adapter
from ppvit.models.backbones import create_backbone
from ppvit.models.methods import apply_method, method_config
from ppvit.serve.app import ServeConfig
from ppvit.serve.bodies import request_bodies
from ppvit.serve.client import Client
from ppvit.serve.tenants import TenantStore

SIDE = 32
INT32_IMAGE = SIDE * SIDE * 3 * 4  # bytes of one int32 ciphertext's values


class PredictBodies:
    """ASGI middleware: for each ``POST /v1/predict`` the body bytes the server received and its status."""

    def __init__(self) -> None:
        self.app: Any = None
        self.seen: list[tuple[int, int]] = []

    def around(self, app: Any) -> PredictBodies:
        self.app = app
        return self

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/predict":
            return await self.app(scope, receive, send)
        received = [0]

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
            return message

        async def answered(message: dict) -> None:
            if message["type"] == "http.response.start":  # noted before the client can read the answer
                self.seen.append((received[0], message["status"]))
            await send(message)

        await self.app(scope, counted, answered)


@pytest.fixture(scope="module")
def lifted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tenant with a random lora-pe adapter trained (as far as the server knows) on ``lift`` in blocks of 4."""
    tmp = tmp_path_factory.mktemp("split")
    torch.manual_seed(0)
    model = apply_method(create_backbone(SMALL, num_classes=4), method_config("lora-pe"))
    with torch.no_grad():  # a head that separates the classes: answers differ from image to image
        model.head.weight.normal_(0, 0.5)
    meta = AdapterMeta(
        SMALL,
        4,
        method_config("lora-pe").to_dict(),
        init_seed=0,
        scheme="lift",
        block_size=4,
        key_fingerprint=KEY.fingerprint,
    )
    save_adapter(model, meta, tmp / "adapter")
    store = TenantStore(tmp / "root")
    token = store.add("lena", tmp / "adapter")
    store.close()
    (tmp / "token").write_text(token)
    rng = np.random.default_rng(0)
    plain = rng.integers(0, 256, (8, SIDE, SIDE, 3), dtype=np.uint8)
    # int32 .npy ciphertext (values past int16, as a lift key whose bound needs int32 makes)
    wide = rng.integers(-40_000, 40_000, (8, SIDE, SIDE, 3), dtype=np.int32)
    files = {"png": [], "npy": []}
    for i in range(8):
        files["png"].append(tmp / f"{i}.png")
        Image.fromarray(plain[i]).save(files["png"][-1])
        files["npy"].append(tmp / f"{i}.npy")
        np.save(files["npy"][-1], wide[i])
    return dict(tmp=tmp, root=tmp / "root", token=token, files=files)


@pytest.fixture(scope="module")
def key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "k.key"
    KEY.save(path)
    return path


def serve(lifted: dict, max_body_bytes: int) -> tuple[LiveServer, PredictBodies]:
    """The lift tenant's server with this body limit (8 images a request), and its record of predict bodies."""
    watch = PredictBodies()
    cfg = ServeConfig(lifted["root"], window_ms=1, max_images=8, max_batch=8, max_body_bytes=max_body_bytes)
    return LiveServer(cfg, wrap=watch.around), watch


def client_predict(lifted: dict, url: str, kind: str, key: Path, *more: str) -> list[str]:
    """``ppvit client predict``'s arguments for the files of ``kind``."""
    files = [str(f) for f in lifted["files"][kind]]
    return [
        "client",
        "predict",
        *files,
        "--server",
        url,
        "--token-file",
        str(lifted["tmp"] / "token"),
        "--key",
        str(key),
        *more,
    ]


def ciphertext(lifted: dict, url: str, kind: str) -> np.ndarray:
    """What the client sends for these files (``.npy`` as they are, plain images encrypted with the key)."""
    with Client(url, lifted["token"]) as c:
        sent = c.encrypt(lifted["files"][kind], KEY)
    if kind == "npy":
        np.testing.assert_array_equal(sent, np.stack([np.load(f) for f in lifted["files"]["npy"]]))
    else:
        np.testing.assert_array_equal(
            sent,
            BlockCipher(KEY, "lift", 4).encrypt(np.stack([np.asarray(Image.open(f)) for f in lifted["files"]["png"]])),
        )
    return sent


@pytest.mark.parametrize("kind", ["npy", "png"])
def test_requests_over_the_body_limit_are_split_within_it_and_answer_as_one_per_image(
    lifted: dict, kind: str, key_path: Path, capsys
) -> None:
    """8 images under a count limit of 8 and a body limit of 3 int32 images: the old client sent one
    request of 8 (98 KB, 413); each request now holds what the limit allows, the answers in order."""
    limit = 128 + 3 * INT32_IMAGE  # a .npy header of 128 bytes and three int32 images: exactly 3 fit
    server, watch = serve(lifted, limit)
    with server:
        info = httpx.get(f"{server.url}/v1/adapter", headers={"Authorization": f"Bearer {lifted['token']}"}).json()
        assert (info["max_images"], info["max_body_bytes"]) == (8, limit)  # published, as data
        sent = ciphertext(lifted, server.url, kind)
        row = sent.itemsize * SIDE * SIDE * 3
        per_request = (limit - 128) // row  # 3 int32 images, 6 int16 ones
        code, out, err = run_cli(client_predict(lifted, server.url, kind, key_path), capsys)
        assert code == 0, err
        splits = list(pairwise([*range(0, 8, per_request), 8]))  # (first, end) of each request
        sizes = [128 + (b - a) * row for a, b in splits]
        assert sizes == [len(npy(sent[a:b])) for a, b in splits]
        assert watch.seen == [(n, 200) for n in sizes]
        assert all(n <= limit for n, _ in watch.seen) and len(watch.seen) == -(-8 // per_request)
        watch.seen.clear()
        headers = {"Authorization": f"Bearer {lifted['token']}", "Content-Type": "application/x-npy"}
        alone = [httpx.post(f"{server.url}/v1/predict", content=npy(c[None]), headers=headers).json() for c in sent]
    said = [line.split("\t") for line in out.splitlines()]
    assert [s[0] for s in said] == [str(f) for f in lifted["files"][kind]]
    assert [s[1] for s in said] == [a["predictions"][0]["label"] for a in alone]
    np.testing.assert_allclose(
        [float(s[2]) for s in said], [a["predictions"][0]["probability"] for a in alone], atol=6e-4
    )


def test_an_image_over_the_body_limit_alone_is_named_with_its_size_and_the_limit(
    lifted: dict, key_path: Path, capsys
) -> None:
    """A body limit under one int32 image: each file is named on one line with its body's size and the
    server's limit, nothing is sent, exit 1; with --strict the first one stops it (exit 2)."""
    limit = 10_000
    server, watch = serve(lifted, limit)
    files = [str(f) for f in lifted["files"]["npy"]]
    with server:
        code, out, err = run_cli(client_predict(lifted, server.url, "npy", key_path), capsys)
        assert code == 1 and out == ""
        failed = [line for line in err.splitlines() if line.startswith("  failed: ")]
        body = f"{128 + INT32_IMAGE:,} bytes"
        assert [line.split(": ")[1] for line in failed] == files
        assert all(body in line and f"{limit:,} bytes" in line for line in failed), err
        code, out, err = run_cli(client_predict(lifted, server.url, "npy", key_path, "--strict"), capsys)
        assert code == 2 and len(err.splitlines()) == 1 and files[0] in err and body in err, err
    assert watch.seen == []


def test_the_reported_case_64_int32_images_of_224_are_two_bodies_under_32_mib() -> None:
    """The issue's figures: 64 int32 ciphertexts of 224x224 (602,112 bytes each, 38.5 MB) under the
    server's defaults (64 images, 32 MiB); 55 fit in one body, (32 MiB - 128) // 602,112. The bodies decode
    to the images in order; without a body limit (an older server) one body, as before."""
    rows = np.arange(64, dtype=np.int32)[:, None, None, None] * np.ones((1, 224, 224, 3), np.int32)
    bodies = list(request_bodies(rows, 64, 32 << 20))
    assert [len(b) for b in bodies] == [128 + 55 * 602_112, 128 + 9 * 602_112]
    decoded = np.concatenate([np.load(io.BytesIO(b)) for b in bodies])
    assert decoded.dtype == np.int32 and decoded[:, 0, 0, 0].tolist() == list(range(64))
    assert [len(b) for b in request_bodies(rows, 64, None)] == [128 + 64 * 602_112]
    assert [len(b) for b in request_bodies(rows[:5], 2, 32 << 20)] == [128 + 2 * 602_112] * 2 + [128 + 602_112]
    with pytest.raises(ValueError, match="602,240 bytes; the server takes at most 600,000"):
        list(request_bodies(rows[:2], 64, 600_000))


def test_predict_reads_and_encrypts_a_chunk_of_whole_requests_at_a_time(
    lifted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`client predict` of a folder read, encrypted and stacked every image before the first request (hostile
    tester): now a chunk at a time, whole requests each; the answers as one pass's, an unreadable file named."""
    from ppvit.serve import client as client_mod

    bad = lifted["tmp"] / "bad.png"
    bad.write_bytes(b"not an image")
    files = [*lifted["files"]["png"], bad]
    cfg = ServeConfig(lifted["root"], window_ms=1, max_images=2, max_batch=8, max_body_bytes=1 << 20)
    with LiveServer(cfg) as server, Client(server.url, lifted["token"]) as c:
        whole = c.predict(files, KEY, failed=[])
        chunks: list[int] = []
        encrypt = Client._encrypt

        def counted(self: Client, images: list, *args: Any) -> np.ndarray | None:
            chunks.append(len(images))
            return encrypt(self, images, *args)

        monkeypatch.setattr(Client, "_encrypt", counted)
        monkeypatch.setattr(client_mod, "PREDICT_CHUNK", 5)  # two requests of 2 a chunk
        failed: list[tuple[str, str]] = []
        chunked = c.predict(files, KEY, failed=failed)
    assert chunks == [4, 4, 1]
    assert [p.label for p in chunked] == [p.label for p in whole] and len(whole) == 8
    np.testing.assert_allclose([p.probability for p in chunked], [p.probability for p in whole], atol=1e-6)
    assert [name for name, _ in failed] == [str(bad)]
