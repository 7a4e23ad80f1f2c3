"""A property-based fuzzer of the HTTP API: requests drawn from the server's own OpenAPI schema
(every operation, its declared query parameters, then any value) with hostile headers and bodies
(.npy headers of any shape and dtype, PNGs with flipped bytes, nested JSON, random bytes).
The property: no answer is a 5xx, and every refusal is one line of JSON. Bounded: a fixed
number of examples, derandomised so that a CI run repeats the same requests (about 30 s)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import LiveServer, build_world, npy, png

from ppvit.serve.app import ServeConfig

EXAMPLES = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> dict:
    return build_world(tmp_path_factory.mktemp("serve"), toy_dataset)


@pytest.fixture(scope="module")
def server(world: dict) -> Iterator[LiveServer]:
    cfg = ServeConfig(world["root"], window_ms=1, max_images=4, max_batch=8, max_body_bytes=256 << 10, docs=True)
    with LiveServer(cfg) as live:
        yield live


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


def json_bodies(valid_png_b64: str) -> st.SearchStrategy[bytes]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10), st.just(valid_png_b64)
    )
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner))
    docs = st.one_of(values, st.fixed_dictionaries({"images": values}))
    return docs.map(lambda d: json.dumps(d).encode())


def test_no_request_drawn_from_the_schema_gets_a_5xx(world: dict, server: LiveServer) -> None:
    import base64

    schema = httpx.get(f"{server.url}/openapi.json").json()
    ops = operations(schema)
    assert {(m, p) for m, p, _ in ops} >= {("POST", "/v1/predict"), ("GET", "/v1/adapter"), ("GET", "/healthz")}
    image = world["images"][0]
    good_png = png(image)
    bodies = st.one_of(
        st.binary(max_size=2048),
        npy_bodies(),
        mutated(npy(world["images"][:2])),
        mutated(good_png),
        json_bodies(base64.b64encode(good_png).decode()),
        st.just(npy(world["images"][:1])),
    )
    tokens = st.sampled_from([world["tokens"]["carol"], world["tokens"]["alice"], "ppvit_nobody", ""])
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
        method, path, params = data.draw(st.sampled_from(ops))
        query = {p["name"]: data.draw(typed_value(p.get("schema", {}))) for p in params if data.draw(st.booleans())}
        headers = data.draw(auth)
        kind = data.draw(kinds)
        if kind:
            headers = [*headers, ("Content-Type", kind)]
        body = data.draw(bodies) if method == "POST" else None
        r = httpx.request(method, f"{server.url}{path}", params=query, headers=headers, content=body, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{method} {path} {query} {headers} -> {r.status_code} {r.text[:200]}"
        if r.status_code != 200:
            assert list(r.json()) == ["error"] and "\n" not in r.json()["error"]

    t0 = time.monotonic()
    request()
    assert time.monotonic() - t0 < 60, "the fuzzer's budget is a minute"
    assert seen.get(200, 0) > 0 and len(seen) >= 4, f"the requests drawn reach too few answers: {seen}"
