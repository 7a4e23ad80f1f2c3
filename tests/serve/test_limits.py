"""The training API under a hostile tenant (issue 31, items 1-5): what a tenant sends cannot make the
server spend memory, device time or response bytes past the operator's limits, and a bad job or
manifest is a one-line 4xx at submission, never a 500 and never a failure when the job runs.

No job runs here: the tenant is two rows of the store (a token and an adapter row that no
training route reads) and the server's runner never starts a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sqlite3
import stat
import sys
import tarfile
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SMALL
from serving import LiveServer, NoTraining, png, tenant_root
from test_hardening import small_disk  # noqa: F401  (a fixture: a 4 MiB tmpfs, as root)

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.sources.wds import read_samples
from ppvit.serve.app import ServeConfig
from ppvit.serve.client import Client, ServerError
from ppvit.serve.datasets import DatasetError, DatasetStore
from ppvit.serve.jobs import JobError, Jobs, ServiceLimits, job_config
from ppvit.serve.runners import LocalRunner
from ppvit.serve.tenants import TenantStore

MANIFEST = {  # a dataset as `ppvit encrypt --format wds --size 32` of 2 classes describes it
    "scheme": "shuffle",
    "block_size": 4,
    "size": 32,
    "key_fingerprint": "ab12cd34",
    "format": "wds",
    "classes": {"train": ["cat", "dog"]},
    "counts": {"train": 1},
    "complete": True,
}
SETTINGS = {"method": "lora-pe", "model": SMALL, "epochs": 2, "batch_size": 8, "val_fraction": 0.25}
GiB = 1 << 30


def spec(path: str, data: bytes) -> dict:
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1 << 16):
        yield data[i : i + (1 << 16)]


def upload(store: DatasetStore, tenant: int, name: str, shard: bytes, manifest: dict | None = None) -> None:
    """Declare a dataset of one train shard and send it."""
    store.declare(tenant, name, manifest or MANIFEST, [spec("train/shard-000000.tar", shard)])
    asyncio.run(store.receive(tenant, name, "train/shard-000000.tar", _chunks(shard)))


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bomb(member_bytes: int) -> bytes:
    """A gzipped tar whose one member holds ``member_bytes`` zeros, built without them: gzip members
    concatenated (one per MiB of zeros, compressed once) are one gzip stream to a reader."""

    def gz(data: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip member
        return c.compress(data) + c.flush()

    header = tarfile.TarInfo("a.png")
    header.size = member_bytes
    mib = gz(bytes(1 << 20))
    end = (-member_bytes) % 512 + 2 * 512  # the member's padding, then the end-of-archive blocks
    return gz(header.tobuf()) + mib * (member_bytes >> 20) + gz(bytes(end))


@pytest.fixture
def store(tmp_path: Path) -> tuple[DatasetStore, int]:
    tenant, _ = tenant_root(tmp_path / "root")
    return DatasetStore(tmp_path / "root", ServiceLimits({}).datasets), tenant


# -- 1. a compressed shard ---------------------------------------------------------------------------


def test_a_gzip_bomb_shard_is_refused_at_upload_without_being_expanded(store: tuple[DatasetStore, int]) -> None:
    """1 MB of gzip holding a 1 GiB member: refused at upload (422, a one-line reason), quickly, and
    the shard stays missing with nothing left on disk but the manifest."""
    datasets, tenant = store
    bomb = gzip_bomb(GiB)
    assert len(bomb) < 2 << 20
    t0 = time.monotonic()
    with pytest.raises(DatasetError) as err:
        upload(datasets, tenant, "bomb", bomb)
    assert time.monotonic() - t0 < 5  # gunzipping 1 GiB takes longer than that here
    assert err.value.status == 422 and "gzip" in str(err.value) and "\n" not in str(err.value)
    assert str(datasets.root) not in str(err.value) and ".tmp" not in str(err.value)
    found = datasets.get(tenant, "bomb")
    assert found.missing == ["train/shard-000000.tar"] and found.counts == {}
    assert [p.name for p in found.folder.rglob("*") if p.is_file()] == ["ppvit-manifest.json"]


def test_the_job_side_reader_refuses_a_compressed_shard_and_an_oversized_member(tmp_path: Path) -> None:
    """What a job reads is bounded too, whatever reached its folder: an encrypted shard is a plain tar
    (the gzip refused by its first bytes), and a member over the reader's bound stops the read from
    its header, before a byte of it is read (a plain WebDataset source may be compressed)."""
    bomb = tmp_path / "shard-000000.tar"
    bomb.write_bytes(gzip_bomb(GiB))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="over 268435456 a member"):
        list(read_samples([bomb], compressed=True))
    with pytest.raises(ValueError, match="gzip-compressed"):
        list(read_samples([bomb]))
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("members", "word"),
    [
        ({"a.png": b"\x89PNG" + bytes(2 << 20)}, "bytes, over"),  # a member past a 32 px PNG's bound
        ({"a.png": png(np.zeros((64, 64, 3), np.uint8)), "a.cls": b"0"}, "64x64, over 32 px"),
        ({"a.png": png(np.zeros((32, 32, 3), np.uint8)), "a.json": b"{}"}, "not a KEY.png or KEY.cls"),
        ({"a.png": b"GIF89a" + bytes(100)}, "not a PNG"),
    ],
    ids=["large member", "large image", "other member", "not png"],
)
def test_a_shard_not_as_encrypt_writes_it_is_refused_at_upload(
    store: tuple[DatasetStore, int], members: dict[str, bytes], word: str
) -> None:
    datasets, tenant = store
    with pytest.raises(DatasetError) as err:
        upload(datasets, tenant, "odd", tar_of(members))
    assert err.value.status == 422 and word in str(err.value), err.value
    assert err.value.args[0].startswith("shard train/shard-000000.tar: ")


# -- 2. the server counts the images -----------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_wds(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> Path:
    """The toy dataset (96 train, 32 test images of 32 px) encrypted into WebDataset shards of 40."""
    work = tmp_path_factory.mktemp("wds") / "toy"
    encrypt_collection(toy_dataset, work, BlockCipher(Key.generate(), "shuffle", 4), 32, "wds", progress=False,
                       shard_size=40)  # fmt: skip
    return work


def upload_folder(datasets: DatasetStore, tenant: int, name: str, folder: Path, **manifest: object) -> None:
    doc = {**json.loads((folder / "ppvit-manifest.json").read_text()), **manifest}
    shards = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/shard-*.tar"))
    datasets.declare(tenant, name, doc, [spec(s, (folder / s).read_bytes()) for s in shards])
    for s in shards:
        asyncio.run(datasets.receive(tenant, name, s, _chunks((folder / s).read_bytes())))


def test_max_steps_hold_against_a_manifest_that_lies_about_its_counts(
    store: tuple[DatasetStore, int], toy_wds: Path, tmp_path: Path
) -> None:
    """The same shards declared with counts.train=8: the server counted 96, and a job of 2 epochs of
    batches of 8 over 72 of them (18 steps) is refused under --max-steps 10, as with the true manifest."""
    datasets, tenant = store
    upload_folder(datasets, tenant, "liar", toy_wds, counts={"train": 8, "test": 32})
    upload_folder(datasets, tenant, "honest", toy_wds)
    limits = ServiceLimits({SMALL: None}, max_steps=10)
    for name in ("liar", "honest"):
        found = datasets.get(tenant, name)
        assert found.counts == {"train": 96, "test": 32}
        with pytest.raises(DatasetError) as err:  # a JobError, or the dataset's own refusal
            job_config(SETTINGS, found, limits, tmp_path / "run")
        assert err.value.status == 422 and "\n" not in str(err.value)
        assert ("8 train images" if name == "liar" else "about 18 optimiser steps") in str(err.value), err.value
    assert job_config(SETTINGS, datasets.get(tenant, "honest"), ServiceLimits({SMALL: None}, max_steps=18), tmp_path)


def test_negative_counts_are_refused_at_declaration(store: tuple[DatasetStore, int]) -> None:
    datasets, tenant = store
    with pytest.raises(DatasetError) as err:
        datasets.declare(tenant, "neg", {**MANIFEST, "counts": {"train": -5}}, [spec("train/shard-000000.tar", b"x")])
    assert err.value.status == 422 and "negative" in str(err.value)


# -- 3. bounds a tenant cannot walk around ------------------------------------------------------------


@pytest.mark.parametrize(
    "classes",
    [{"train": ["cat", "x" * (4 << 20)]}, {"train": ["c"] * 10_001}, {"train": [f"{i:0128d}" for i in range(5000)]}],
    ids=["4 MB name", "too many", "too many bytes"],
)
def test_class_names_are_bounded_at_declaration(store: tuple[DatasetStore, int], classes: dict) -> None:
    datasets, tenant = store
    with pytest.raises(DatasetError) as err:
        datasets.declare(tenant, "big", {**MANIFEST, "classes": classes}, [spec("train/shard-000000.tar", b"x")])
    assert err.value.status == 422 and "class" in str(err.value) and len(str(err.value)) < 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> Path:
    """A run of one epoch of the micro ViT (an adapter to register)."""
    from conftest import train_config

    from ppvit.train.loop import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(train_config(out, toy_dataset, None, scheme="none", method="linear", epochs=1))
    return out


def test_a_long_class_label_is_refused_at_add_tenant(trained: Path, tmp_path: Path) -> None:
    """A 10 MB class label (every answer and GET /v1/adapter would carry it) is refused by add-tenant."""
    from ppvit.models.adapters import CONFIG_NAME, adapter_files

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    config, weights = adapter_files(trained / "adapter")
    (run / "adapter" / weights.name).write_bytes(weights.read_bytes())
    doc = json.loads(config.read_text())
    doc["classes"][0] = "x" * (10 << 20)
    (run / "adapter" / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="class name of 10485760 characters") as err:
        TenantStore(tmp_path / "root").add("mallory", run / "adapter")
    assert len(str(err.value)) < 300


BOUNDED = [  # a setting past its operator's bound (ServiceLimits' defaults)
    {"rank": 10**9},
    {"rank": 100_000},
    {"batch_size": 10**9},
    {"grad_accum": 10**9},
    {"loader_workers": 10**6},
    {"save_every_steps": 1},
    {"dist_timeout_s": 1e9},
    {"epochs": 51},
]


@pytest.mark.parametrize("change", BOUNDED, ids=[next(iter(c)) + str(next(iter(c.values()))) for c in BOUNDED])
def test_every_job_setting_that_sizes_the_work_has_an_operator_bound(
    store: tuple[DatasetStore, int], toy_wds: Path, tmp_path: Path, change: dict
) -> None:
    err = refused_job(store, toy_wds, tmp_path, change)
    assert err.status == 422 and next(iter(change)) in str(err) and "this server" in str(err)


def refused_job(store: tuple[DatasetStore, int], toy_wds: Path, tmp_path: Path, change: dict) -> JobError:
    """The JobError that submitting the toy dataset's job with ``change`` raises (it must raise)."""
    datasets, tenant = store
    upload_folder(datasets, tenant, "toy", toy_wds)
    with pytest.raises(JobError) as err:
        job_config({**SETTINGS, **change}, datasets.get(tenant, "toy"), ServiceLimits({SMALL: None}), tmp_path)
    return err.value


# -- 5. one schema, at submission ------------------------------------------------------------------


BAD_MANIFESTS = [
    {"scheme": "pwn"},
    {"size": 10**9},
    {"block_size": 1},
    {"classes": {"train": {"cat": 0}}},
    {"counts": {"train": "8"}},
    {"size": "32"},
    {"nonsense": 1},
    {"format": "npz"},
]


@pytest.mark.parametrize("change", BAD_MANIFESTS, ids=[f"{k}={v}"[:20] for c in BAD_MANIFESTS for k, v in c.items()])
def test_a_bad_manifest_is_refused_at_declaration(store: tuple[DatasetStore, int], change: dict) -> None:
    datasets, tenant = store
    with pytest.raises(DatasetError) as err:
        datasets.declare(tenant, "m", {**MANIFEST, **change}, [spec("train/shard-000000.tar", b"x")])
    assert err.value.status == 422 and "manifest" in str(err.value) and "__init__" not in str(err.value)
    assert "\n" not in str(err.value) and str(datasets.root) not in str(err.value)


NAMED_MANIFESTS = [  # (change, what the refusal names): each was accepted at declaration
    ({"key_fingerprint": "\ud800x"}, "key_fingerprint"),  # a lone surrogate: no UTF-8 writes it
    ({"classes": {"train": ["\ud800", "dog"]}}, "classes"),
    ({"preprocess": {"size": 32, "kernel": "\ud800", "mean": None, "std": None}}, "preprocess"),
    ({"classes": {"train": ["a", "a", "a"]}}, "classes of train: 'a' is named more than once"),
    ({"classes": {"train": ["cat", "dog"], "test": ["dog", "cat", "dog"]}}, "classes of test: 'dog'"),
]


@pytest.mark.parametrize(("change", "named"), NAMED_MANIFESTS, ids=[n for _, n in NAMED_MANIFESTS])
def test_a_manifest_refused_at_declaration_names_what_is_wrong(
    store: tuple[DatasetStore, int], change: dict, named: str
) -> None:
    datasets, tenant = store
    with pytest.raises(DatasetError) as err:
        datasets.declare(tenant, "m", {**MANIFEST, **change}, [spec("train/shard-000000.tar", b"x")])
    text = str(err.value)
    assert err.value.status == 422 and text.startswith("manifest: ") and named in text and "\n" not in text, text
    text.encode("utf-8")  # the refusal itself can be answered


BAD_JOBS = [
    {"batch_size": -8},
    {"batch_size": 0},
    {"batch_size": "8"},
    {"epochs": "3"},
    {"grad_accum": 0},
    {"head_init": "pwn"},
    {"lr": "abc"},
    {"val_fraction": 1.0},
    {"method": "linear", "rank": 4},
    {"seed": -1},
    {"targets": ["qv"]},
    # accepted, then the job failed when it ran (hostile client): streamed shards take no part or subset, no
    # validation share of 0 or of all but no image, and a CPU-only server compiles for nothing
    {"part": "abc"},
    {"part": "5/2"},
    {"train_subset": 8},
    {"test_subset": 8},
    {"val_fraction": 0},
    {"val_fraction": 0.9999},
    {"compile": True},
    {"image_column": "\ud800"},  # a lone surrogate: every answer naming it failed in the client
    {"splits": {"train": "tr\ud800"}},  # a structured setting too
]


@pytest.mark.parametrize("change", BAD_JOBS, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in BAD_JOBS])
def test_a_bad_job_is_refused_at_submission_in_one_line(
    store: tuple[DatasetStore, int], toy_wds: Path, tmp_path: Path, change: dict
) -> None:
    err = refused_job(store, toy_wds, tmp_path, change)
    text = str(err)
    assert err.status == 422 and list(change)[-1] in text and "\n" not in text, text
    assert "__init__" not in text and "Error" not in text and str(store[0].root) not in text


def test_a_batch_must_fit_the_training_images_that_training_leaves_after_validation(
    store: tuple[DatasetStore, int], toy_wds: Path, tmp_path: Path
) -> None:
    """The training set a run would step over (its streamed train part: 96 images less those a hash of their key
    holds out) takes a batch of exactly its size, and refuses one more naming that count: the server's rule is
    training's, not a rounding of 96 x 0.5. A GPU server compiles."""
    from ppvit.data.datasets import load_splits

    held = len(load_splits(toy_wds, 0.5, seed=0).train)
    assert held != 48  # the hash's count, not the share's
    datasets, tenant = store
    upload_folder(datasets, tenant, "toy", toy_wds)
    found, limits = datasets.get(tenant, "toy"), ServiceLimits({SMALL: None}, devices=["0"])
    settings = {**SETTINGS, "val_fraction": 0.5, "compile": True}
    cfg = job_config({**settings, "batch_size": held}, found, limits, tmp_path / "run")
    assert cfg.optim.batch_size == held and cfg.backbone.compile is True
    with pytest.raises(JobError) as err:
        job_config({**settings, "batch_size": held + 1}, found, limits, tmp_path / "run")
    assert err.value.status == 422
    assert str(err.value) == (
        f"config: batch_size {held + 1} is larger than the training set: val_fraction 0.5 leaves {held} of the 96 "
        "train images"
    )


def test_datasets_per_tenant_and_shards_per_declaration_are_bounded(tmp_path: Path) -> None:
    tenant, _ = tenant_root(tmp_path / "root")
    datasets = DatasetStore(tmp_path / "root", ServiceLimits({}, max_datasets=3, max_shards=5).datasets)
    for i in range(3):
        datasets.declare(tenant, f"d{i}", MANIFEST, [spec("train/shard-000000.tar", b"x")])
    with pytest.raises(DatasetError) as err:
        datasets.declare(tenant, "d3", MANIFEST, [spec("train/shard-000000.tar", b"x")])
    assert err.value.status == 429 and "3 datasets" in str(err.value)
    datasets.delete(tenant, "d0")
    shards = [spec(f"train/shard-{i:06d}.tar", b"x") for i in range(6)]
    with pytest.raises(DatasetError) as err:
        datasets.declare(tenant, "d3", MANIFEST, shards)
    assert err.value.status == 422 and "1 to 5" in str(err.value)


def test_job_logs_and_errors_show_no_server_path(store: tuple[DatasetStore, int], toy_wds: Path) -> None:
    """The last log line and the error a tenant reads name the dataset, the run and the weights by
    what they are, never by the server's paths (its root, the tenant's id, the weights file)."""
    datasets, tenant = store
    upload_folder(datasets, tenant, "pets", toy_wds)
    weights = datasets.root.parent / "secret" / "base.safetensors"
    jobs = Jobs(datasets.root, ServiceLimits({SMALL: str(weights)}))
    job = jobs.submit(tenant, datasets.get(tenant, "pets"), SETTINGS, False)
    run = jobs.folder(job["id"]) / "run"
    data = datasets.folder(tenant, "pets")
    line = f"training lora-pe from weights {weights}; data {data}: run {run} in {datasets.root}/x"
    (jobs.folder(job["id"]) / "log.txt").write_text(f"starting\n{line}\n")
    with sqlite3.connect(datasets.root / "tenants.sqlite") as con:
        con.execute("UPDATE jobs SET error = ? WHERE id = ?", (line, job["id"]))
    shown = jobs.get(tenant, job["id"])
    for text in (shown["log"], shown["error"]):
        assert str(datasets.root.parent) not in text and f"/{tenant}/" not in text, text
        assert text == (
            f"training lora-pe from weights <weights of {SMALL}>; data <dataset pets>: run <run> in <server>/x"
        )


def _modes(root: Path) -> set[tuple[str, str]]:
    """(kind, octal mode) of everything under ``root`` but the database's own files."""
    return {
        ("dir" if p.is_dir() else "file", oct(stat.S_IMODE(p.stat().st_mode)))
        for p in root.rglob("*")
        if not p.name.startswith("tenants.sqlite")
    }


def test_training_folders_are_0700_and_their_files_0600(
    store: tuple[DatasetStore, int], toy_wds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the inference store: datasets, shards, a job's config and log, and what its process writes."""
    datasets, tenant = store
    old = os.umask(0o022)  # a server started with the usual umask
    try:
        upload_folder(datasets, tenant, "toy", toy_wds)
        jobs = Jobs(datasets.root, ServiceLimits({SMALL: None}))
        job = jobs.submit(tenant, datasets.get(tenant, "toy"), SETTINGS, False)
        folder = jobs.folder(job["id"])
        writes = "import os; os.makedirs('run/sub'); open('run/sub/out', 'w').write('x')"
        monkeypatch.setattr("ppvit.serve.runners.train_command", lambda *a: [sys.executable, "-c", writes])
        runner = LocalRunner()
        monkeypatch.chdir(folder)
        handle = runner.start(job["id"], folder / "config.yaml", folder / "log.txt", ["cpu"])
        while runner.poll(handle) is None:
            time.sleep(0.05)
    finally:
        os.umask(old)
    assert (folder / "run" / "sub" / "out").read_text() == "x"
    assert _modes(datasets.root) == {("dir", "0o700"), ("file", "0o600")}


# -- 4. no 500 on POST /v1/jobs, 507 on a full disk ---------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, toy_wds: Path) -> Iterator[dict]:
    """A live server with training on, a tenant and its uploaded toy dataset; no job ever starts."""
    root = tmp_path_factory.mktemp("service") / "root"
    _, token = tenant_root(root)
    limits = NoTraining({SMALL: None}, max_shards=50)
    with LiveServer(ServeConfig(root, training=limits)) as live, Client(live.url, token) as c:
        c.upload(toy_wds, "toy")
        yield {"url": live.url, "token": token, "client": c, "root": root}


@pytest.mark.parametrize(
    "change", [{"epochs": "3"}, {"batch_size": 0}, {"batch_size": "8"}, {"grad_accum": 0}, {"lr": [1]}]
)
def test_post_jobs_answers_4xx_for_bad_values(service: dict, change: dict) -> None:
    with pytest.raises(ServerError) as err:
        service["client"].submit("toy", {**SETTINGS, **change})
    assert err.value.status == 422 and next(iter(change)) in str(err.value)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 413),  # past the body's bound: never parsed
        (b"[" * 30_000 + b"]" * 30_000, 400),  # past the parser's nesting
        (b'{"dataset": "toy", "config": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001, 400),
        (json.dumps({"dataset": "toy", "config": SETTINGS, "activate": "no"}).encode(), 422),
        (json.dumps({"dataset": "toy", "config": {**SETTINGS, "x" * 70_000: 1}}).encode(), 413),
    ],
    ids=["nested 100000", "nested 30000", "nested config", "activate text", "large"],
)
def test_post_jobs_answers_4xx_for_bad_bodies(service: dict, body: bytes, status: int) -> None:
    headers = {"Authorization": f"Bearer {service['token']}", "Content-Type": "application/json"}
    r = httpx.post(f"{service['url']}/v1/jobs", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text[:200]
    assert list(r.json()) == ["error"]


def test_a_declaration_past_the_shard_bound_is_refused_before_it_is_parsed(service: dict) -> None:
    """The body of a declaration is bounded by the server's --max-shards (here 50 shards: about 1 MiB)."""
    shards = [spec(f"train/shard-{i:06d}.tar", b"x") for i in range(20_000)]
    with pytest.raises(ServerError) as err:
        service["client"]._call("PUT", "/v1/datasets/many", json={"manifest": MANIFEST, "shards": shards})
    assert err.value.status == 413


def test_declaring_a_dataset_on_a_full_disk_answers_507(small_disk: Path) -> None:  # noqa: F811
    _, token = tenant_root(small_disk / "root")
    with LiveServer(ServeConfig(small_disk / "root", training=NoTraining({SMALL: None}))) as live:
        with pytest.raises(OSError), open(small_disk / "fill", "wb", buffering=0) as fh:
            while True:
                fh.write(bytes(1 << 16))
        r = httpx.put(
            f"{live.url}/v1/datasets/toy",
            json={"manifest": MANIFEST, "shards": [spec("train/shard-000000.tar", b"x")]},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    assert r.status_code == 507, r.text
    assert "root" not in r.json()["error"]


def test_shards_stored_before_the_server_counted_are_counted_or_sent_again(
    store: tuple[DatasetStore, int], toy_wds: Path
) -> None:
    """A store of an earlier release: its received shards have no count. The good ones are counted
    when the dataset is next read; one that the check refuses (here made a gzip) is missing again."""
    datasets, tenant = store
    upload_folder(datasets, tenant, "old", toy_wds)
    folder = datasets.folder(tenant, "old")
    (folder / "test" / "shard-000000.tar").write_bytes(gzip_bomb(1 << 20))
    with sqlite3.connect(datasets.root / "tenants.sqlite") as con:
        con.execute("UPDATE shards SET images = NULL")
    found = datasets.get(tenant, "old")
    assert found.counts == {"train": 96} and found.missing == ["test/shard-000000.tar"]


def test_the_job_list_answers_the_newest_jobs_only(store: tuple[DatasetStore, int], toy_wds: Path) -> None:
    """GET /v1/jobs stays bounded however many jobs a tenant ran: its newest 100, oldest first."""
    datasets, tenant = store
    upload_folder(datasets, tenant, "toy", toy_wds)
    jobs = Jobs(datasets.root, ServiceLimits({SMALL: None}))
    config = jobs.get(tenant, jobs.submit(tenant, datasets.get(tenant, "toy"), SETTINGS, False)["id"])
    with sqlite3.connect(datasets.root / "tenants.sqlite") as con:
        yaml_text = con.execute("SELECT config FROM jobs").fetchone()[0]
        con.executemany(
            "INSERT INTO jobs (id, tenant_id, dataset, state, config, activate, created) "
            "VALUES (?, ?, 'toy', 'succeeded', ?, 0, ?)",
            [(f"job-{i:012d}", tenant, yaml_text, config["created"] + 1 + i) for i in range(150)],
        )
    listed = [j["id"] for j in jobs.list(tenant)]
    assert listed == [f"job-{i:012d}" for i in range(50, 150)]


def test_a_dataset_recorded_by_the_previous_release_is_found_again_with_or_without_a_listing(
    store: tuple[DatasetStore, int],
) -> None:
    """A manifest's ``listing`` (the client's source, local) was recorded with the dataset: every row of the
    previous release, which has none, then differed from the same declaration (409, `client train` broken)."""

    datasets, tenant = store
    shards = [spec("train/shard-000000.tar", b"x")]
    datasets.declare(tenant, "old", MANIFEST, shards)
    with sqlite3.connect(datasets.root / "tenants.sqlite") as con:  # the row as the previous release wrote it
        (row,) = con.execute("SELECT manifest FROM datasets WHERE name = 'old'").fetchone()
        doc = json.loads(row)
        assert "listing" not in doc  # recorded without it now
        con.execute("UPDATE datasets SET manifest = ? WHERE name = 'old'", (json.dumps(doc, sort_keys=True),))
    again = datasets.declare(tenant, "old", {**MANIFEST, "listing": "a" * 64}, shards)  # a client that sends one
    assert again.name == "old"


def test_finished_jobs_past_the_kept_number_go_with_their_folders(
    store: tuple[DatasetStore, int], toy_wds: Path
) -> None:
    """Jobs cancelled while queued cost nothing and left rows and folders for ever (150 in 14 s), and finished
    jobs' folders (14 MiB each) counted in no quota (hostile tester): past --jobs-kept the oldest go, by when they
    ended (a long job just ended is kept: second reader), and the sweep at start takes finished jobs' checkpoints."""
    datasets, tenant = store
    upload_folder(datasets, tenant, "toy", toy_wds)
    jobs = Jobs(datasets.root, ServiceLimits({SMALL: None}, jobs_kept=3))
    first = jobs.get(tenant, jobs.submit(tenant, datasets.get(tenant, "toy"), SETTINGS, False)["id"])
    t = first["created"]
    rows = [(f"job-{i:012d}", state, t + 1 + i, None) for i, state in
            enumerate(["succeeded", "failed", "cancelled", "succeeded", "cancelled"])]  # fmt: skip
    rows.append(("job-00000000000a", "succeeded", t - 10, t + 100))  # the oldest submitted, the last to end
    with sqlite3.connect(datasets.root / "tenants.sqlite") as con:
        yaml_text = con.execute("SELECT config FROM jobs").fetchone()[0]
        con.execute("UPDATE jobs SET state = 'running'")  # an active job is never pruned
        con.executemany(
            "INSERT INTO jobs (id, tenant_id, dataset, state, config, activate, created, ended) "
            "VALUES (?, ?, 'toy', ?, ?, 0, ?, ?)",
            [(j, tenant, state, yaml_text, created, ended) for j, state, created, ended in rows],
        )
    for j, *_ in rows:
        (jobs.folder(j) / "run").mkdir(parents=True)
        (jobs.folder(j) / "run" / "checkpoint.pt").write_bytes(b"a finished job's")
    (jobs.folder("job-ffffffffffff") / "run").mkdir(parents=True)  # no row: a pruning cut short
    newest = jobs.submit(tenant, datasets.get(tenant, "toy"), SETTINGS, False)["id"]
    kept = {j["id"] for j in jobs.list(tenant)}
    assert kept == {first["id"], newest, "job-00000000000a", "job-000000000003", "job-000000000004"}
    assert not any(jobs.folder(f"job-{i:012d}").exists() for i in range(3))
    assert jobs.folder("job-ffffffffffff").exists() and (jobs.folder("job-000000000004") / "run/checkpoint.pt").exists()
    jobs.sweep()
    assert not jobs.folder("job-ffffffffffff").exists() and jobs.folder(newest).exists()
    assert not (jobs.folder("job-000000000004") / "run" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="jobs kept: 0; at least 1"):
        ServiceLimits({SMALL: None}, jobs_kept=0)
