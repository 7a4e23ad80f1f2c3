"""ppvit serve: routed multi-tenant inference over real HTTP on 127.0.0.1, its client and its tenant registry.

The four tenants of :mod:`serving`; routed logits are checked against each adapter's own model
(``load_adapter``, what ``ppvit predict`` runs).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import SMALL, assert_no_key_material, free_port, recorder, train_config
from PIL import Image
from safetensors.torch import load_file, save_file
from serving import EVERY_CLASS, TENANTS, LiveServer, build_world, dense, key_of, npy, png, reference_logits

from ppvit.data.preprocess import KERNEL, Preprocess
from ppvit.models.adapters import WEIGHTS_NAME, AdapterMeta, load_adapter, read_adapter_meta
from ppvit.models.backbones import create_backbone
from ppvit.models.configs import method_config
from ppvit.models.methods import apply_method
from ppvit.models.routing import NotRoutable, RoutedViT, routed_adapter
from ppvit.serve.app import ServeConfig
from ppvit.serve.client import Client, ServerError
from ppvit.serve.tenants import TenantStore
from ppvit.train.inference import adapter_pipeline
from ppvit.train.loop import train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> dict:
    return build_world(tmp_path_factory.mktemp("serve"), toy_dataset)


@pytest.fixture(scope="module")
def live(world: dict) -> Iterator[LiveServer]:
    with LiveServer(
        ServeConfig(world["root"], window_ms=300, max_batch=64, max_images=16, max_body_bytes=1 << 20, metrics=True)
    ) as server:
        yield server


def test_mixed_batch_logits_equal_each_adapters_own_model(world: dict, live: LiveServer) -> None:
    images = world["images"][:6]

    def ask(tenant: str) -> list:
        with Client(live.url, world["tokens"][tenant]) as c:
            key = key_of(world, tenant)
            return c.predict(list(images), key, logits=True, plain=key is None, top_k=EVERY_CLASS)

    with ThreadPoolExecutor(len(TENANTS)) as pool:  # within the 300 ms window: one routed forward
        answers = dict(zip(TENANTS, pool.map(ask, TENANTS), strict=True))
    for tenant, preds in answers.items():
        served = torch.tensor([dense(p.top, "logit") for p in preds])
        torch.testing.assert_close(served, reference_logits(world, tenant, images), rtol=0, atol=1e-4)
    metrics = httpx.get(f"{live.url}/metrics").text
    one_adapter = _metric(metrics, 'ppvit_batch_adapters_bucket{le="1.0"}')
    assert _metric(metrics, "ppvit_batch_adapters_count") > one_adapter, "no forward mixed tenants"
    assert _metric(metrics, "ppvit_routing_copy_bytes") > 0  # the mixed pass's adapters, written into slots


def test_passes_replayed_as_recorded_graphs_answer_as_each_adapters_own_model(
    world: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--cuda-graphs`` end to end, its CUDA capture replaced by the CPU recorder of the same contract: mixed and
    one-tenant batches answer each adapter's own logits, and /metrics counts the recordings."""
    monkeypatch.setattr("ppvit.serve.cache.cuda_graph", lambda device: recorder)
    cfg = ServeConfig(world["root"], window_ms=300, max_batch=64, max_images=16, metrics=True)
    cfg.cuda_graphs = True  # (the config refuses it on a CPU device; the recorder stands in for the GPU)
    images = world["images"][:3]
    with LiveServer(cfg) as live:

        def ask(tenant: str) -> list:
            with Client(live.url, world["tokens"][tenant]) as c:
                key = key_of(world, tenant)
                return c.predict(list(images), key, logits=True, plain=key is None, top_k=EVERY_CLASS)

        for together in (list(TENANTS), list(TENANTS)[:1]):  # within the window: all four together, then one
            with ThreadPoolExecutor(len(together)) as pool:
                answers = dict(zip(together, pool.map(ask, together), strict=True))
            for tenant, preds in answers.items():
                served = torch.tensor([dense(p.top, "logit") for p in preds])
                torch.testing.assert_close(served, reference_logits(world, tenant, images), rtol=0, atol=1e-4)
        # the batcher's fair passes here hold at most 4 images, and the first one all 4 tenants: one recording
        metrics = httpx.get(f"{live.url}/metrics").text
        assert _metric(metrics, "ppvit_routing_graph_captures") == 1
        assert _metric(metrics, "ppvit_routing_graphs_failed") == 0


def test_cuda_graphs_need_a_cuda_device_and_a_device_is_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        ServeConfig(tmp_path, cuda_graphs=True)
    with pytest.raises(ValueError, match="device 'gpu0': not a torch device"):
        ServeConfig(tmp_path, device="gpu0")
    assert ServeConfig(tmp_path, cuda_graphs=True, device="cuda:1").cuda_graphs  # (no GPU needed to configure)


def _metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_mixed_batch_never_mixes_rows(world: dict) -> None:
    """Each row of one routed forward equals that row computed alone with its own adapter."""
    base = create_backbone(SMALL, weights=world["weights"])
    routed = RoutedViT(base)
    adapters = [
        routed_adapter(
            read_adapter_meta(world["runs"][t] / "adapter"),
            load_file(str(world["runs"][t] / "adapter" / WEIGHTS_NAME)),
            base,
        )
        for t in TENANTS
    ]
    x = torch.randn(8, 3, 32, 32)
    index = torch.tensor([3, 0, 1, 2, 2, 1, 0, 3])
    together = routed(x, adapters, index)
    for i in range(8):
        alone = routed(x[i : i + 1], [adapters[index[i]]], torch.zeros(1, dtype=torch.long))[0]
        torch.testing.assert_close(together[i], alone, rtol=0, atol=1e-5)
    assert len({tuple(r.shape) for r in together}) == 1  # every toy tenant has 4 classes


def test_misrouted_ciphertext_is_not_understood(world: dict) -> None:
    """alice's ciphertexts through bob's adapter (another key) lose what alice's own adapter gets right."""
    images, labels = world["images"], torch.from_numpy(world["labels"])
    own_model, own_meta = load_adapter(world["runs"]["alice"] / "adapter", world["weights"])
    other_model, _ = load_adapter(world["runs"]["bob"] / "adapter", world["weights"])
    x = adapter_pipeline(own_meta, own_model, key_of(world, "alice"), False)(torch.from_numpy(images), train=False)
    with torch.no_grad():
        own = (own_model.eval()(x).argmax(1) == labels).float().mean().item()
        other = (other_model.eval()(x).argmax(1) == labels).float().mean().item()
    assert own >= 0.9
    assert other < own - 0.3


def test_auth(world: dict, live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/v1/adapter").status_code == 401
    r = httpx.get(f"{live.url}/v1/adapter", headers={"Authorization": "Bearer ppvit_not-a-token"})
    assert r.status_code == 401 and r.json() == {"error": "unknown token"}
    body = npy(np.zeros((1, 32, 32, 3), np.uint8))
    r = httpx.post(f"{live.url}/v1/predict", content=body, headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 401
    for tenant in TENANTS:  # each token sees its own adapter only
        info = Client(live.url, world["tokens"][tenant]).info()
        assert info["tenant"] == tenant
        meta = read_adapter_meta(world["runs"][tenant] / "adapter")
        assert (info["scheme"], info["key_fingerprint"]) == (meta.scheme, meta.key_fingerprint)
        assert info["method"] == TENANTS[tenant][0]
        assert info["input_size"] == 32 and info["block_size"] == (None if meta.scheme is None else 4)
        # the recipe as data: what training recorded, stated as the adapter's (SMALL: timm's 0.5 mean and std)
        assert meta.preprocess == Preprocess(32, KERNEL, (0.5,) * 3, (0.5,) * 3)
        assert info["preprocess"] == {"size": 32, "kernel": KERNEL, "mean": [0.5] * 3, "std": [0.5] * 3}


def stated(info: dict) -> httpx.MockTransport:
    """A server that states ``info`` for the tenant's adapter and records whether anything else was asked."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/adapter", "the client sent something before refusing"
        return httpx.Response(200, json=info)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ({"size": 32, "kernel": "pil-bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}, "kernel is pil-bilinear"),
        ({"size": 64, "kernel": KERNEL, "mean": [0.5] * 3, "std": [0.5] * 3}, "size is 64, not 32"),
        ({"size": 32, "kernel": KERNEL, "mean": "x", "std": [0.5] * 3}, "preprocess must be"),
    ],
)
def test_the_client_refuses_an_adapter_whose_recipe_differs_from_what_it_sends(
    world: dict, recipe: dict, words: str
) -> None:
    info = {"tenant": "carol", "version": 1, "scheme": None, "block_size": None, "key_fingerprint": None}
    info |= {"input_size": 32, "max_images": 4, "preprocess": recipe}
    with Client("http://server", "t", transport=stated(info)) as c, pytest.raises(ValueError, match=words) as err:
        c.encrypt(list(world["images"][:1]), None, plain=True)
    assert "refusing" in str(err.value) and "\n" not in str(err.value)
    good = info | {"preprocess": {"size": 32, "kernel": KERNEL, "mean": [0.1] * 3, "std": [0.2] * 3}}
    for agreeing in (good, {k: v for k, v in info.items() if k != "preprocess"}):  # mean/std: the server's; none: old
        with Client("http://server", "t", transport=stated(agreeing)) as c:
            assert c.encrypt(list(world["images"][:1]), None, plain=True).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "words"),
    [
        ("image/png", b"not an image", 415, "not a PNG"),
        ("image/png", b"\x89PNG\r\n\x1a\n broken", 400, "not a readable image"),
        ("application/x-npy", b"\x93NUMPY garbage", 400, "not a .npy"),
        ("application/x-npy", npy(np.zeros((1, 48, 48, 3), np.uint8)), 422, "48x48"),
        ("application/x-npy", npy(np.zeros((1, 32, 32, 4), np.uint8)), 422, "4 channels"),
        ("image/png", png(np.zeros((32, 32), np.uint8)), 422, "1 channels"),
        ("application/x-npy", npy(np.zeros((1, 32, 32, 3), np.float32)), 422, "uint8"),
        ("application/x-npy", npy(np.zeros((17, 32, 32, 3), np.uint8)), 413, "limit is 16"),
        ("application/x-npy", b"\0" * (2 << 20), 413, "limit"),
        ("application/json", b'{"images": "x"}', 400, "JSON body"),
        ("text/plain", b"hello", 415, "content type"),
    ],
)
def test_bad_input_is_one_line_4xx_and_the_server_goes_on(
    world: dict, live: LiveServer, content_type: str, body: bytes, status: int, words: str
) -> None:
    headers = {"Authorization": f"Bearer {world['tokens']['carol']}", "Content-Type": content_type}
    r = httpx.post(f"{live.url}/v1/predict", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"] and "\n" not in r.json()["error"]
    ok = Client(live.url, world["tokens"]["carol"]).predict(list(world["images"][:2]), None, plain=True)
    assert len(ok) == 2


def test_png_and_json_bodies_answer_likenpy(world: dict, live: LiveServer) -> None:
    import base64

    c = Client(live.url, world["tokens"]["alice"])
    ct = c.encrypt(list(world["images"][:3]), key_of(world, "alice"))
    via_npy = [dense(p.top) for p in c.predict_ciphertext(ct, top_k=EVERY_CLASS)]
    headers = {"Authorization": f"Bearer {world['tokens']['alice']}"}
    url = f"{live.url}/v1/predict?top_k={EVERY_CLASS}"
    r = httpx.post(url, json={"images": [base64.b64encode(png(a)).decode() for a in ct]}, headers=headers)
    np.testing.assert_allclose([dense(p["top"]) for p in r.json()["predictions"]], via_npy, atol=1e-6)
    r = httpx.post(url, content=png(ct[0]), headers={**headers, "Content-Type": "image/png"})
    np.testing.assert_allclose(dense(r.json()["predictions"][0]["top"]), via_npy[0], atol=1e-6)


def test_the_client_sends_ciphertext_only(world: dict, live: LiveServer) -> None:
    sent: list[bytes] = []
    transport = httpx.HTTPTransport()

    class Spy(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request.read() + str(request.url).encode() + str(request.headers).encode())
            return transport.handle_request(request)

    key = key_of(world, "alice")
    images = world["images"][:4]
    with Client(live.url, world["tokens"]["alice"], transport=Spy()) as c:
        c.predict(list(images), key)
    assert_no_key_material([*sent], key)
    body = sent[-1]
    ct = np.load(io.BytesIO(body[: body.index(b"http://")]))
    assert not np.array_equal(ct, images)  # not the plain images
    assert sorted(ct[0].ravel()) == sorted(images[0].ravel())  # a shuffle: the same values, moved
    expected = Client(live.url, world["tokens"]["alice"]).encrypt(list(images), key)
    np.testing.assert_array_equal(ct, expected)


def test_a_wrong_key_is_refused_before_anything_is_sent(world: dict, live: LiveServer) -> None:
    sent: list[str] = []

    class Spy(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request.url.path)
            return httpx.HTTPTransport().handle_request(request)

    with Client(live.url, world["tokens"]["alice"], transport=Spy()) as c, pytest.raises(ValueError, match="finger"):
        c.predict(list(world["images"][:1]), key_of(world, "bob"))
    assert sent == ["/v1/adapter"]


def test_damaged_adapter_fails_its_tenant_only_and_restart_keeps_tenants(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "fresh")
    tokens = {t: store.add(t, world["runs"][t]) for t in ("alice", "carol")}
    (tmp_path / "fresh" / "adapters" / "alice" / "v1" / WEIGHTS_NAME).write_bytes(b"garbage")
    with LiveServer(ServeConfig(tmp_path / "fresh", window_ms=1)) as server:
        with pytest.raises(ServerError) as err:
            Client(server.url, tokens["alice"]).predict(list(world["images"][:1]), key_of(world, "alice"))
        assert err.value.status == 503 and "alice" in str(err.value)
        assert len(Client(server.url, tokens["carol"]).predict(list(world["images"][:2]), None, plain=True)) == 2
    with LiveServer(ServeConfig(tmp_path / "fresh", window_ms=1)) as server:  # restarted: tenants kept
        assert Client(server.url, tokens["carol"]).info()["tenant"] == "carol"


def test_new_adapter_version_and_removal(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "root")
    token = store.add("erin", world["runs"]["carol"])
    assert store.set_adapter("erin", world["runs"]["alice"]) == 2
    assert (tmp_path / "root" / "adapters" / "erin" / "v1").is_dir()  # the old version stays for requests in flight
    with LiveServer(ServeConfig(tmp_path / "root", window_ms=1)) as server:
        info = Client(server.url, token).info()
        assert (info["version"], info["method"]) == (2, "lora-pe")
        store.remove("erin")
        r = httpx.get(f"{server.url}/v1/adapter", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


def test_registry_refuses_full_adapters_bad_names_and_duplicates(
    world: dict, tmp_path: Path, toy_dataset: Path
) -> None:
    store = TenantStore(tmp_path / "root")
    full = tmp_path / "full"
    train(train_config(full, toy_dataset, None, method="full", scheme="none", weights=str(world["weights"]), epochs=1))
    with pytest.raises(ValueError, match="full fine-tuning"):
        store.add("frank", full)
    with pytest.raises(ValueError, match="tenant name"):
        store.add("../x", world["runs"]["carol"])
    store.add("carol", world["runs"]["carol"])
    with pytest.raises(ValueError, match="exists already"):
        store.add("carol", world["runs"]["carol"])
    with pytest.raises(ValueError, match="sha256 differs"):
        store.add("other", world["runs"]["carol"], weights=world["keys"]["A"])
    model, meta = load_adapter(full / "adapter", world["weights"])
    with pytest.raises(NotRoutable, match="full fine-tuning"):
        routed_adapter(meta, load_file(str(full / "adapter" / WEIGHTS_NAME)), model)


def test_only_the_token_hash_is_stored(world: dict) -> None:
    db = (world["root"] / "tenants.sqlite").read_bytes()
    for token in world["tokens"].values():
        assert token.encode() not in db and token.removeprefix("ppvit_").encode() not in db


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_cli_add_list_and_client_predict(world: dict, tmp_path: Path) -> None:
    def ppvit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ppvit.cli", *args], capture_output=True, text=True, timeout=120)

    root, token_file = tmp_path / "root", tmp_path / "alice.token"
    r = ppvit(
        "serve",
        "add-tenant",
        str(root),
        "alice",
        "--adapter",
        str(world["runs"]["alice"]),
        "--token-file",
        str(token_file),
    )
    assert r.returncode == 0, r.stderr
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert "alice\tversion 1" in ppvit("serve", "list-tenants", str(root)).stdout
    r = ppvit("serve", "add-tenant", str(root), "alice", "--adapter", str(world["runs"]["alice"]))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "exists already" in r.stderr
    files = []
    for i, a in enumerate(world["images"][:3]):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(files[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with LiveServer(ServeConfig(root, window_ms=1)) as server:
        where = ["--server", server.url, "--token-file", str(token_file), "--key", str(world["keys"]["A"])]
        r = ppvit("client", "predict", *map(str, files), *where)
        # an unreadable file among them (issue 29: the client stopped at it): skipped, named, exit 1
        skipped = ppvit("client", "predict", str(files[0]), str(broken), *map(str, files[1:]), *where)
        strict = ppvit("client", "predict", str(files[0]), str(broken), "--strict", *where)
    assert r.returncode == 0, r.stderr
    labels = [line.split("\t")[1] for line in r.stdout.splitlines()]
    assert len(labels) == 3 and all(label.startswith("class") for label in labels)
    assert skipped.returncode == 1, skipped.stderr
    assert skipped.stdout == r.stdout  # the same answers for the readable files, in order
    assert f"failed: {broken}:" in skipped.stderr and "1 image failed (named above)" in skipped.stderr
    assert strict.returncode == 2 and strict.stdout == "" and str(broken) in strict.stderr


def test_shutdown_answers_requests_in_flight(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "root")
    token = store.add("carol", world["runs"]["carol"])
    server = LiveServer(ServeConfig(tmp_path / "root", window_ms=500)).__enter__()
    c = Client(server.url, token)
    c.info()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.predict, list(world["images"][:2]), None, plain=True)
        time.sleep(0.2)  # the request waits in the 500 ms batching window
        server.__exit__()
        answer = pending.result(timeout=30)
    assert len(answer) == 2


# -- faults (issue 16): damaged or removed adapters, a killed server, a client that goes away ----------


def test_adapter_damaged_or_removed_while_serving_fails_that_tenant_only(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "root")
    tokens = {t: store.add(t, world["runs"][t]) for t in ("alice", "bob", "carol")}
    images = list(world["images"][:2])
    # a 1-byte cache budget keeps only the last adapter: each tenant's next request reads its files again
    with LiveServer(ServeConfig(tmp_path / "root", window_ms=1, cache_bytes=1)) as server:
        clients = {t: Client(server.url, tok) for t, tok in tokens.items()}
        for t, c in clients.items():
            c.predict(images, key_of(world, t), plain=t == "carol")
        (tmp_path / "root" / "adapters" / "alice" / "v1" / WEIGHTS_NAME).write_bytes(b"\0" * 100)
        shutil.rmtree(tmp_path / "root" / "adapters" / "bob")
        for t in ("alice", "bob"):
            with pytest.raises(ServerError) as err:
                clients[t].predict(images, key_of(world, t))
            assert err.value.status == 503 and t in str(err.value)
        assert len(clients["carol"].predict(images, None, plain=True)) == 2
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


def _serve_process(root: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ppvit.cli", "serve", "--root", str(root), "--port", str(port), "--window-ms", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_server_killed_under_load_then_restarted_never_answers_with_another_tenants_model(
    world: dict, tmp_path: Path
) -> None:
    store = TenantStore(tmp_path / "root")
    tenants = ("alice", "bob", "carol")
    tokens = {t: store.add(t, world["runs"][t]) for t in tenants}
    images = world["images"][:2]
    expected = {t: reference_logits(world, t, images).softmax(-1) for t in tenants}
    port = free_port()
    proc = _serve_process(tmp_path / "root", port)
    url = f"http://127.0.0.1:{port}"
    answers: list[tuple[str, dict]] = []
    stop = threading.Event()

    def load(t: str) -> None:
        c = Client(url, tokens[t], timeout=10)
        ct = c.encrypt(list(images), key_of(world, t), plain=t == "carol")
        while not stop.is_set():
            try:
                answers.append((t, {"p": [dense(p.top) for p in c.predict_ciphertext(ct, top_k=EVERY_CLASS)]}))
            except ServerError:
                time.sleep(0.05)  # refused or cut off by the kill: allowed; a wrong answer is not

    with ThreadPoolExecutor(len(tenants)) as pool:
        loads = [pool.submit(load, t) for t in tenants]
        time.sleep(3)
        proc.kill()
        proc.wait(10)
        served_before = len(answers)
        proc = _serve_process(tmp_path / "root", port)  # restarted: the same tenants, from SQLite
        time.sleep(3)
        stop.set()
        for f in loads:
            f.result()  # a load thread's exception (e.g. a half-written answer) fails the test
    proc.terminate()
    proc.wait(30)
    assert served_before > 0 and len(answers) > served_before
    for t, answer in answers:
        np.testing.assert_allclose(answer["p"], expected[t].numpy(), atol=1e-4, err_msg=f"tenant {t}")


def test_a_client_that_goes_away_mid_request_harms_nobody(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "root")
    token = store.add("carol", world["runs"]["carol"])
    with LiveServer(ServeConfig(tmp_path / "root", window_ms=400)) as server:
        c = Client(server.url, token)
        ct = c.encrypt(list(world["images"][:2]), None, plain=True)
        impatient = Client(server.url, token, timeout=0.1)
        with pytest.raises(ServerError):  # gives up while its request waits in the batching window
            impatient.predict_ciphertext(ct)
        time.sleep(0.6)  # the forward it was part of has run and found nobody to answer
        assert len(c.predict_ciphertext(ct)) == 2
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_request_in_flight_finishes_on_the_version_it_started_with(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "root")
    token = store.add("carol", world["runs"]["carol"])
    body = npy(world["images"][:1])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"}
    with LiveServer(ServeConfig(tmp_path / "root", window_ms=500)) as server, ThreadPoolExecutor(1) as pool:
        url = f"{server.url}/v1/predict?top_k={EVERY_CLASS}"
        first = pool.submit(httpx.post, url, content=body, headers=headers, timeout=30)
        time.sleep(0.25)  # resolved to version 1, waiting in the batching window
        assert store.set_adapter("carol", world["runs"]["bob"]) == 2
        old = first.result()
        new = httpx.post(f"{server.url}/v1/predict", content=body, headers=headers, timeout=30)
    assert (old.json()["version"], new.json()["version"]) == (1, 2)
    expected_old = reference_logits(world, "carol", world["images"][:1]).softmax(-1)
    np.testing.assert_allclose(dense(old.json()["predictions"][0]["top"]), expected_old[0].numpy(), atol=1e-5)


# -- review findings: a reused tenant id, bodies that declare more than they hold, plaintext, errors ----------


def test_a_later_tenant_never_gets_a_removed_tenants_cached_adapter(world: dict, tmp_path: Path) -> None:
    store = TenantStore(tmp_path / "root")
    token = store.add("alice", world["runs"]["alice"])
    with LiveServer(ServeConfig(tmp_path / "root", window_ms=1)) as server:
        assert Client(server.url, token).info()["tenant"] == "alice"  # alice's adapter now cached
        store.remove("alice")
        for name, run in (("mallory", "bob"), ("alice", "bob")):  # a new tenant, and the old name again
            info = Client(server.url, store.add(name, world["runs"][run])).info()
            assert (info["tenant"], info["key_fingerprint"]) == (name, key_of(world, "bob").fingerprint)
            store.remove(name)


def _header_only(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 16


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (_header_only((64, 300_000, 300_000, 3)), "application/x-npy", 413),  # 17 TB declared, 16 bytes sent
        (_header_only((1, 300_000, 300_000, 3)), "application/x-npy", 422),
        (_header_only((1, 32, 32, 3)), "application/x-npy", 400),  # the right shape, too few bytes
        (png(np.zeros((4096, 4096, 3), np.uint8)), "image/png", 422),  # 49 kB that decode to 48 MB
    ],
)
def test_declared_sizes_are_refused_before_anything_is_allocated(
    world: dict, live: LiveServer, body: bytes, content_type: str, status: int
) -> None:
    headers = {"Authorization": f"Bearer {world['tokens']['carol']}", "Content-Type": content_type}
    t0 = time.perf_counter()
    r = httpx.post(f"{live.url}/v1/predict", content=body, headers=headers, timeout=30)
    assert r.status_code == status and "error" in r.json()
    assert time.perf_counter() - t0 < 2.0


def test_too_many_json_images_are_refused_before_decoding(world: dict, live: LiveServer) -> None:
    import base64

    big = base64.b64encode(png(np.zeros((2048, 2048, 3), np.uint8))).decode()  # 12 MB each, decoded
    headers = {"Authorization": f"Bearer {world['tokens']['carol']}"}
    r = httpx.post(f"{live.url}/v1/predict", json={"images": [big] * 17}, headers=headers, timeout=30)
    assert r.status_code == 413 and "limit is 16" in r.json()["error"]


def test_framework_errors_are_one_line_json_too(world: dict, live: LiveServer) -> None:
    r = httpx.get(f"{live.url}/no/such/path")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    headers = {"Authorization": f"Bearer {world['tokens']['carol']}", "Content-Type": "application/x-npy"}
    r = httpx.post(f"{live.url}/v1/predict?logits=maybe", content=npy(world["images"][:1]), headers=headers)
    assert r.status_code == 422 and "logits" in r.json()["error"]
    assert "no/such" not in httpx.get(f"{live.url}/metrics").text  # unknown paths share one label


def test_the_client_never_sends_plain_images_unasked(world: dict, live: LiveServer) -> None:
    c = Client(live.url, world["tokens"]["carol"])  # an adapter trained on plain images: the server says "none"
    with pytest.raises(ValueError, match="unencrypted"):
        c.predict(list(world["images"][:1]), key_of(world, "alice"))  # a key given: refused
    with pytest.raises(ValueError, match="unencrypted"):
        c.predict(list(world["images"][:1]), None)  # no key, but plain not asked for
    assert len(c.predict(list(world["images"][:1]), None, plain=True)) == 1


def test_the_client_splits_a_long_list_by_the_servers_limit(world: dict, live: LiveServer) -> None:
    images = list(np.concatenate([world["images"]] * 2)[:40])  # the server takes 16 a request
    answers = Client(live.url, world["tokens"]["alice"]).predict(images, key_of(world, "alice"))
    assert len(answers) == 40


def test_routing_matches_each_adapter_across_class_counts_ranks_and_targets(tmp_path: Path) -> None:
    """Random adapters of every routable kind, 10/7/3/5 classes, one mixed forward."""
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(create_backbone(SMALL).state_dict(), str(weights))
    specs = [
        ("lora-pe", {"rank": 4}, 10),
        ("melo", {"rank": 2, "alpha": 8.0, "targets": "all"}, 7),
        ("linear", {}, 3),
        ("lora-pe", {"rank": 8, "targets": "qkv", "train_pos_embed": True}, 5),
    ]
    base = create_backbone(SMALL, weights=weights)
    routed, adapters, models = RoutedViT(base), [], []
    for method, opts, classes in specs:
        model = apply_method(
            create_backbone(SMALL, num_classes=classes, weights=weights), method_config(method, **opts)
        )
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        meta = AdapterMeta(SMALL, classes, method_config(method, **opts).to_dict(), weights_sha256="x")
        tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        adapters.append(routed_adapter(meta, tensors, base))
        models.append(model.eval())
    x = torch.randn(8, 3, 32, 32)
    index = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = routed(x, adapters, index)
    for j, i in enumerate(index.tolist()):
        with torch.no_grad():
            torch.testing.assert_close(out[j], models[i](x[j : j + 1])[0], rtol=0, atol=1e-5)
    for adapter, model in zip(adapters, models, strict=True):  # a batch of one client: the shared-matrix path
        alone = torch.stack(routed(x, [adapter], torch.zeros(len(x), dtype=torch.long)))
        with torch.no_grad():
            torch.testing.assert_close(alone, model(x), rtol=0, atol=1e-5)
    with pytest.raises(NotRoutable, match="transformer blocks"):
        routed_adapter(adapters[1].meta, {"attn_pool.mlp.fc1.lora_A.default.weight": torch.zeros(2, 48)}, base)


def test_registration_refuses_what_routing_cannot_serve(world: dict, tmp_path: Path, toy_dataset: Path) -> None:
    run = tmp_path / "cls"
    train(
        train_config(
            run,
            toy_dataset,
            None,
            method="melo",
            scheme="none",
            weights=str(world["weights"]),
            train_cls_token=True,
            epochs=1,
        )
    )
    with pytest.raises(NotRoutable, match="cls_token"):
        TenantStore(tmp_path / "root").add("cls", run)
    assert TenantStore(tmp_path / "root").list() == []
    with pytest.raises(ValueError, match="tenant name"):
        TenantStore(tmp_path / "root").add("alice\n", world["runs"]["carol"])
    store = TenantStore(tmp_path / "root")
    store.add("Alice", world["runs"]["carol"])
    with pytest.raises(ValueError, match="exists already"):
        store.add("alice", world["runs"]["carol"])


def test_the_client_can_pin_the_scheme_instead_of_trusting_the_server(world: dict, live: LiveServer) -> None:
    images = list(world["images"][:1])
    assert (
        len(Client(live.url, world["tokens"]["alice"], scheme="shuffle").predict(images, key_of(world, "alice"))) == 1
    )
    with pytest.raises(ValueError, match="not shuffle\\+scramble"):  # alice's adapter says shuffle
        Client(live.url, world["tokens"]["alice"], scheme="shuffle+scramble").predict(images, key_of(world, "alice"))
