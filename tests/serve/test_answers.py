"""The size of the server's answers (issue 31, item 3): a head of many long class names must not make
every prediction, or every ``GET /v1/adapter``, large and slow to encode.

Tenants here are random lora-pe adapters on the micro ViT (no training), served in-process.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import SMALL
from fastapi.testclient import TestClient

from ppvit._io import json_text
from ppvit.models.adapters import AdapterMeta, save_adapter
from ppvit.models.backbones import create_backbone
from ppvit.models.methods import apply_method, method_config
from ppvit.serve import codec
from ppvit.serve.app import ServeConfig, create_app
from ppvit.serve.client import Client
from ppvit.serve.defaults import MAX_CLASS_NAME
from ppvit.serve.tenants import TenantStore

HEADS = {"few": 10, "many": 2000}  # tenant: classes, each named by MAX_CLASS_NAME characters


def names(count: int) -> list[str]:
    return [f"{c:0{MAX_CLASS_NAME}d}" for c in range(count)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("answers")
    store = TenantStore(tmp / "root")
    tokens = {}
    for i, (tenant, classes) in enumerate(HEADS.items()):
        torch.manual_seed(i)
        model = apply_method(create_backbone(SMALL, num_classes=classes), method_config("lora-pe"))
        with torch.no_grad():  # a head that separates the classes: probabilities are not all equal
            model.head.weight.normal_(0, 0.5)
        meta = AdapterMeta(
            SMALL, classes, method_config("lora-pe").to_dict(), pretrained=False, init_seed=0, classes=names(classes)
        )
        save_adapter(model, meta, tmp / tenant)
        tokens[tenant] = store.add(tenant, tmp / tenant)
    store.close()
    with TestClient(create_app(ServeConfig(tmp / "root"))) as client:
        yield client, tokens


def image() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    return buf.getvalue()


def predict(server: tuple[TestClient, dict[str, str]], tenant: str, query: str = "") -> httpx.Response:
    client, tokens = server
    headers = {"Authorization": f"Bearer {tokens[tenant]}", "Content-Type": "application/x-npy"}
    return client.post(f"/v1/predict{query}", content=image(), headers=headers)


def adapter(server: tuple[TestClient, dict[str, str]], tenant: str, **headers: str) -> httpx.Response:
    client, tokens = server
    return client.get("/v1/adapter", headers={"Authorization": f"Bearer {tokens[tenant]}", **headers})


def test_a_predictions_size_does_not_grow_with_the_class_count(server: tuple[TestClient, dict[str, str]]) -> None:
    """5 classes named (the default top_k), whatever the head: one image's answer holds 6 names of 128
    characters (label and top 5) and a few numbers, under 2 KB; a probability per class of a
    2,000-class head was over 40 KB."""
    sizes = {}
    for tenant in HEADS:
        r = predict(server, tenant)
        assert r.status_code == 200, r.text
        sizes[tenant] = len(r.content)
        (answer,) = r.json()["predictions"]
        assert len(answer["top"]) == 5 and "probabilities" not in answer
    bound = 6 * (MAX_CLASS_NAME + 80) + 200  # six labels with index and probability, and the envelope
    assert sizes["many"] <= bound and sizes["few"] <= bound, sizes
    assert abs(sizes["many"] - sizes["few"]) < 100  # only the digits of the numbers differ


def test_the_top_classes_are_the_most_probable_in_order(server: tuple[TestClient, dict[str, str]]) -> None:
    """Asking for every class of the 10-class head with logits: the probabilities are the softmax of the
    logits, in descending order, each named by its index's label, and the answer's label is the first."""
    r = predict(server, "few", "?top_k=10&logits=true")
    (answer,) = r.json()["predictions"]
    top = answer["top"]
    assert sorted(t["index"] for t in top) == list(range(10))
    logits = torch.zeros(10, dtype=torch.float64)
    for t in top:
        logits[t["index"]] = t["logit"]
        assert t["label"] == names(10)[t["index"]]
    expected = torch.exp(logits) / torch.exp(logits).sum()
    for t in top:
        assert t["probability"] == pytest.approx(float(expected[t["index"]]), abs=1e-6)
    probabilities = [t["probability"] for t in top]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > probabilities[-1]
    assert (answer["label"], answer["index"], answer["probability"]) == (
        top[0]["label"],
        top[0]["index"],
        top[0]["probability"],
    )
    three = predict(server, "few", "?top_k=3").json()["predictions"][0]["top"]
    assert [t["index"] for t in three] == [t["index"] for t in top[:3]] and "logit" not in three[0]


@pytest.mark.parametrize("top_k", [1, 3, 5, 12])
def test_a_requests_answers_rank_every_row_by_value_then_index(top_k: int) -> None:
    """Rows of integer logits (ties everywhere, at the k-th value and inside the top) ranked as one matrix:
    each row's classes are those of a plain sort by (-logit, index), with the float64 softmax's probabilities."""
    from types import SimpleNamespace

    rng = np.random.default_rng(top_k)
    logits = rng.integers(-3, 4, (40, 12)).astype(np.float64)
    logits[0] = 1.0  # a row of one value: every class tied
    served = SimpleNamespace(
        meta=SimpleNamespace(classes=None, num_classes=12), tenant=SimpleNamespace(tenant="t", version=1)
    )
    doc = json.loads(codec.answers_json(served, list(torch.from_numpy(logits).float()), logits=True, top_k=top_k))
    for row, answer in zip(logits, doc["predictions"], strict=True):
        expected = sorted(range(12), key=lambda c: (-row[c], c))[:top_k]
        assert [t["index"] for t in answer["top"]] == expected
        p = np.exp(row) / np.exp(row).sum()
        assert [t["probability"] for t in answer["top"]] == pytest.approx(p[expected].tolist(), abs=1e-6)
        assert [t["logit"] for t in answer["top"]] == row[expected].tolist()
        assert (answer["index"], answer["label"]) == (expected[0], str(expected[0]))


def test_top_classes_are_ordered_by_value_then_index() -> None:
    p = np.array([0.1, 0.3, 0.3, 0.0, 0.3])
    assert codec.top_classes(p, 2) == [1, 2]  # three tied at the top: the lower indices first
    assert codec.top_classes(p, 4) == [1, 2, 4, 0]
    assert codec.top_classes(p, 9) == [1, 2, 4, 0, 3]
    assert codec.top_classes(np.full(4096, 1 / 4096), 3) == [0, 1, 2]


@pytest.mark.parametrize("value", ["0", "-1", "21", "99999999999999999999999", "abc", "1.5", ""])
def test_top_k_out_of_bounds_or_not_an_integer_is_a_one_line_422(
    server: tuple[TestClient, dict[str, str]], value: str
) -> None:
    r = predict(server, "many", f"?top_k={value}")
    assert r.status_code == 422, r.text
    assert "top_k" in r.json()["error"] and "\n" not in r.json()["error"]


def test_top_k_past_the_head_answers_every_class_once(server: tuple[TestClient, dict[str, str]]) -> None:
    top = predict(server, "few", "?top_k=20").json()["predictions"][0]["top"]  # 20: the max, over 10 classes
    assert sorted(t["index"] for t in top) == list(range(10))


def test_the_operator_bounds_top_k(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top-k"):
        ServeConfig(tmp_path, top_k=30, max_top_k=20)
    with pytest.raises(ValueError, match="top-k"):
        ServeConfig(tmp_path, top_k=0)


def test_the_adapter_answer_is_encoded_once_and_equals_a_fresh_encoding(
    server: tuple[TestClient, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/adapter of the 2,000-name head (about 270 KB): encoded on the first request of this
    adapter version, the same bytes afterwards, equal to encoding the settings afresh."""
    real, calls = codec.json_text, []
    monkeypatch.setattr(codec, "json_text", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    bodies = [adapter(server, "many").content for _ in range(3)]
    assert len(calls) <= 1  # encoded once, or not at all if an earlier test asked first
    assert bodies[0] == bodies[1] == bodies[2]
    info = json.loads(bodies[0])
    assert info["classes"] == names(2000) and info["tenant"] == "many"
    assert bodies[0] == json_text(info, indent=None).encode()  # the one JSON writer's encoding


def test_an_unchanged_adapter_answer_is_a_304(server: tuple[TestClient, dict[str, str]]) -> None:
    first = adapter(server, "many")
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and etag != adapter(server, "few").headers["etag"]
    again = adapter(server, "many", **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert adapter(server, "many", **{"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert adapter(server, "many", **{"If-None-Match": '"other"'}).content == first.content
    assert adapter(server, "few", **{"If-None-Match": etag}).status_code == 200  # another tenant's tag


def test_the_client_asks_for_top_k_and_reads_the_ranked_classes() -> None:
    sent = []
    answer = {"label": "b", "index": 1, "probability": 0.7}
    ranked = [{**answer}, {"label": "a", "index": 0, "probability": 0.2}]

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(dict(request.url.params))
        return httpx.Response(200, json={"version": 3, "predictions": [{**answer, "top": ranked}]})

    with Client("http://server", "t", transport=httpx.MockTransport(handler)) as c:
        (p,) = c.predict_ciphertext(np.zeros((1, 32, 32, 3), np.uint8), top_k=2)
        c.predict_ciphertext(np.zeros((1, 32, 32, 3), np.uint8))
    assert sent == [{"top_k": "2"}, {}]  # no top_k: the server's default
    assert (p.label, p.probability, p.version) == ("b", 0.7, 3)
    assert [(t.label, t.index, t.probability, t.logit) for t in p.top] == [("b", 1, 0.7, None), ("a", 0, 0.2, None)]


def test_slots_are_at_least_one_and_their_bytes_not_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slots"):
        ServeConfig(tmp_path, slots=0)
    with pytest.raises(ValueError, match="slot bytes"):
        ServeConfig(tmp_path, slot_bytes=-1)
