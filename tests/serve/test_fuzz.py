"""A property-based fuzzer of the HTTP API: requests drawn from the server's own OpenAPI schema
(every operation, training's included, its path parameters from real names and hostile text,
its declared query parameters, then any value) with hostile headers and bodies (.npy headers
of any shape and dtype, PNGs with flipped bytes, nested JSON, job settings of any type and
size, manifests and shard lists bent field by field, random bytes). The property: no answer
is a 5xx, and every refusal is one line of JSON. Bounded: a fixed number of examples,
derandomised so that a CI run repeats the same requests (400 took 124 s on a machine shared
by several test runs). No job runs: the server's runner starts no process."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from conftest import SMALL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import LiveServer, NoTraining, build_world, npy, png

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.serve.app import ServeConfig
from ppvit.serve.client import Client
from ppvit.train.config import HINTS

EXAMPLES = int(os.environ.get("PPVIT_FUZZ_EXAMPLES", "150"))  # 300+ on purpose: PPVIT_FUZZ_EXAMPLES


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> dict:
    return build_world(tmp_path_factory.mktemp("serve"), toy_dataset)


@pytest.fixture(scope="module")
def server(world: dict, toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The world's server with training on (no process ever started), alice's toy dataset uploaded
    and a job of hers on it (so that it cannot be deleted from under the fuzzer)."""
    training = NoTraining({SMALL: None}, max_shards=20, max_datasets=4, quota_bytes=8 << 20)
    cfg = ServeConfig(world["root"], window_ms=1, max_images=4, max_batch=8, max_body_bytes=256 << 10, docs=True)
    cfg.training = training
    wds = tmp_path_factory.mktemp("fuzz-wds") / "toy"
    encrypt_collection(toy_dataset, wds, BlockCipher(Key.load(world["keys"]["A"]), "shuffle", 4), 32, "wds",
                       progress=False, shard_size=40)  # fmt: skip
    with LiveServer(cfg) as live, Client(live.url, world["tokens"]["alice"]) as alice:
        alice.upload(wds, "toy")
        live.manifest = json.loads((wds / "ppvit-manifest.json").read_text())  # type: ignore[attr-defined]
        live.job = alice.submit("toy", {"model": SMALL, "epochs": 1, "batch_size": 8})["id"]  # type: ignore[attr-defined]
        yield live


def path_values(job_id: str) -> dict[str, st.SearchStrategy[str]]:
    """Values of each path parameter: real names of alice's (which bob and others must not reach) and hostile ones."""
    hostile = st.one_of(st.text(max_size=30), st.sampled_from(["..", ".", "a" * 200, "%00", "x/../y", " "]))
    return {
        "name": st.one_of(st.sampled_from(["toy", "TOY", "new", "other"]), hostile),
        "job_id": st.one_of(st.sampled_from([job_id, "job-000000000000"]), hostile),
        "split": st.one_of(st.just("train"), st.just("test"), hostile),
        "file": st.one_of(st.just("shard-000000.tar"), st.just("shard-000009.tar"), hostile),
    }


def job_bodies(leaves: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """POST /v1/jobs documents: a dataset name, settings of every flat name with values of any type and size."""
    numbers = st.sampled_from([0, -8, 1, 3, 10**9, 2**70, 1.0, 0.5, -1e300, "3", "8", "abc", "pwn", [1], {"a": 1}])
    settings = st.dictionaries(
        st.one_of(st.sampled_from([*sorted(HINTS), "model", "method", "data", "key"]), st.text(max_size=8)),
        st.one_of(numbers, leaves),
        max_size=6,
    )
    base = st.fixed_dictionaries({"model": st.sampled_from([SMALL, "vit_base_patch16_224"])})
    config = st.one_of(st.builds(lambda b, s: {**b, **s}, base, settings), leaves)
    doc = st.fixed_dictionaries(
        {"dataset": st.sampled_from(["toy", "nope", 3]), "config": config},
        optional={"activate": st.one_of(st.booleans(), leaves), "processes": st.one_of(st.integers(-2, 3), leaves)},
    )
    return doc.map(lambda d: json.dumps(d).encode())


def declarations(manifest: dict, leaves: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """PUT /v1/datasets/NAME documents: the real manifest with fields changed, and shard lists of any shape."""
    bent = st.builds(
        lambda k, v: {**manifest, k: v}, st.sampled_from([*sorted(manifest), "extra"]), st.one_of(leaves, st.just(-5))
    )
    shard = st.fixed_dictionaries(
        {
            "path": st.one_of(st.just("train/shard-000000.tar"), st.text(max_size=20)),
            "bytes": st.one_of(st.integers(-1, 1 << 40), leaves),
            "sha256": st.one_of(st.just("0" * 64), st.text(max_size=64)),
        }
    )
    shards = st.one_of(st.lists(shard, max_size=3), leaves)
    doc = st.fixed_dictionaries({"manifest": st.one_of(st.just(manifest), bent, leaves), "shards": shards})
    return doc.map(lambda d: json.dumps(d).encode())


def operations(schema: dict) -> list[tuple[str, str, list[dict]]]:
    """(method, path, query parameters) of every operation the schema declares."""
    return [
        (method.upper(), path, [p for p in op.get("parameters", []) if p.get("in") == "query"])
        for path, item in schema["paths"].items()
        for method, op in item.items()
    ]


def typed_value(schema: dict) -> st.SearchStrategy[str]:
    """A query value of the declared type, or anything at all."""
    kind = schema.get("type")
    typed = {
        "boolean": st.sampled_from(["true", "false", "1", "0", "yes"]),
        "integer": st.integers(-(10**20), 10**20).map(str),
    }.get(kind, st.text(max_size=20))
    return st.one_of(typed, st.text(max_size=40))


def npy_bodies() -> st.SearchStrategy[bytes]:
    shapes = st.lists(st.one_of(st.integers(-3, 70), st.just(True)), min_size=0, max_size=5)
    descr = st.sampled_from(["|u1", "<f4", "|b1", "<i8", "|V3", "O", "u1"])

    def build(shape: list, d: str, fortran: bool, extra: int) -> bytes:
        header = f"{{'descr': {d!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
        text = header.encode() + b" " * ((-(10 + len(header) + 1)) % 64) + b"\n"
        n = int(np.prod([abs(int(x)) for x in shape])) if shape else 1
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * min(n + extra, 1 << 17)

    return st.builds(build, shapes, descr, st.booleans(), st.integers(-5, 5))


def mutated(blob: bytes) -> st.SearchStrategy[bytes]:
    """``blob`` with a few bytes changed, cut short or extended."""

    def apply(edits: list[tuple[int, int]], cut: int | None) -> bytes:
        b = bytearray(blob)
        for pos, value in edits:
            b[pos % len(b)] = value
        return bytes(b[:cut] if cut is not None else b)

    pos = st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255))
    return st.builds(apply, st.lists(pos, max_size=6), st.one_of(st.none(), st.integers(0, len(blob))))


def leaves(valid_png_b64: str) -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10), st.just(valid_png_b64))


def json_bodies(valid_png_b64: str) -> st.SearchStrategy[bytes]:
    values = st.recursive(
        leaves(valid_png_b64), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner)
    )
    docs = st.one_of(values, st.fixed_dictionaries({"images": values}))
    return docs.map(lambda d: json.dumps(d).encode())


def test_no_request_drawn_from_the_schema_gets_a_5xx(world: dict, server: LiveServer) -> None:
    import base64

    schema = httpx.get(f"{server.url}/openapi.json").json()
    ops = operations(schema)
    assert {(m, p) for m, p, _ in ops} >= {
        ("POST", "/v1/predict"),
        ("GET", "/v1/adapter"),
        ("GET", "/healthz"),
        ("PUT", "/v1/datasets/{name}"),
        ("PUT", "/v1/datasets/{name}/shards/{split}/{file}"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/jobs/{job_id}/activate"),
        ("GET", "/v1/jobs/{job_id}/metrics"),
    }
    image = world["images"][0]
    good_png = png(image)
    b64 = base64.b64encode(good_png).decode()
    bodies = st.one_of(
        st.binary(max_size=2048),
        npy_bodies(),
        mutated(npy(world["images"][:2])),
        mutated(good_png),
        json_bodies(b64),
        st.just(npy(world["images"][:1])),
        job_bodies(leaves(b64)),
        declarations(server.manifest, leaves(b64)),  # type: ignore[attr-defined]
        st.just(b"[" * 5000 + b"]" * 5000),
    )
    params = path_values(server.job)  # type: ignore[attr-defined]
    tokens = st.sampled_from(
        [world["tokens"]["carol"], world["tokens"]["alice"], world["tokens"]["alice"], "ppvit_nobody", ""]
    )
    auth = st.one_of(
        st.builds(lambda t: [("Authorization", f"Bearer {t}".strip())], tokens),
        st.builds(lambda t: [("Authorization", f"Bearer {t}".strip())] * 2, tokens),
        st.builds(
            lambda s: [("Authorization", s.strip())], st.text(st.characters(min_codepoint=32, max_codepoint=126))
        ),
        st.just([]),
    )
    kinds = st.sampled_from(["application/x-npy", "image/png", "application/json", "image/jpeg", "text/plain", ""])
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def request(data: st.DataObject) -> None:
        method, path, declared = data.draw(st.sampled_from(ops))
        query = {p["name"]: data.draw(typed_value(p.get("schema", {}))) for p in declared if data.draw(st.booleans())}
        for name, values in params.items():
            if "{" + name + "}" in path:
                path = path.replace("{" + name + "}", quote(data.draw(values), safe=""))
        headers = data.draw(auth)
        kind = data.draw(kinds)
        if kind:
            headers = [*headers, ("Content-Type", kind)]
        body = data.draw(bodies) if method in ("POST", "PUT") else None
        r = httpx.request(method, f"{server.url}{path}", params=query, headers=headers, content=body, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{method} {path} {query} {headers} -> {r.status_code} {r.text[:200]}"
        if r.status_code >= 400:  # a refusal (a 307 to the path without its trailing slash is none)
            assert list(r.json()) == ["error"] and "\n" not in r.json()["error"]

    t0 = time.monotonic()
    request()
    assert time.monotonic() - t0 < 150, f"the fuzzer's budget: {EXAMPLES} requests in 150 s on a busy machine"
    assert seen.get(200, 0) > 0 and len(seen) >= 4, f"the requests drawn reach too few answers: {seen}"
