"""The store's rows and files when two requests interleave or a process dies between two steps: adapter
versions registered at once, a dataset deleted while a job is submitted for it or while it is deleted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from serving import tenant_root
from starlette.requests import ClientDisconnect
from test_supervisor import staged_copy

import ppvit.serve.datasets as datasets
import ppvit.serve.supervisor as supervisor
import ppvit.serve.tenants as tenants
from ppvit.data.sources.encrypted_wds import EncryptedWds
from ppvit.serve.datasets import TRASH, Dataset, DatasetStore
from ppvit.serve.jobs import JobError, Jobs, ServiceLimits
from ppvit.serve.service_db import service_db
from ppvit.serve.tenants import TenantStore

MANIFEST = {
    "scheme": "shuffle",
    "block_size": 4,
    "size": 32,
    "key_fingerprint": "f" * 16,
    "format": "wds",
    "classes": {"train": ["a", "b"]},
    "counts": {"train": 10},
    "complete": True,
}


def shards(n: int) -> list[dict]:
    return [{"path": f"train/shard-{i:06d}.tar", "bytes": 100, "sha256": f"{i:064x}"} for i in range(n)]


def received(root: Path, tenant_id: int, name: str) -> None:
    """Every declared shard received (its row done, a tar of its images' empty PNG members where the shard lies,
    which a job's batch is checked against; 1 or 2 shards)."""
    with service_db(root) as con:
        rows = con.execute("SELECT path FROM shards WHERE tenant_id = ? AND dataset = ?", (tenant_id, name)).fetchall()
        con.execute(  # the manifest's 10 training images, spread over the shards
            "UPDATE shards SET done = 1, images = ? WHERE tenant_id = ? AND dataset = ?",
            (10 // len(rows), tenant_id, name),
        )
    for number, (path,) in enumerate(rows):
        file = root / "datasets" / str(tenant_id) / name / path
        file.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(file, "w") as tar:
            for i in range(10 // len(rows)):
                tar.addfile(tarfile.TarInfo(f"a/{number}-{i}.png"))


def a_dataset_read(root: Path, count: int) -> tuple[int, DatasetStore, Jobs, Dataset]:
    """A tenant's dataset "d" of ``count`` shards, all received, as a job request has read it; its store and jobs."""
    tenant_id, _ = tenant_root(root)
    store = DatasetStore(root)
    store.declare(tenant_id, "d", MANIFEST, shards(count))
    received(root, tenant_id, "d")
    return (
        tenant_id,
        store,
        Jobs(root, ServiceLimits(models={"vit_micro_d2_patch4_32": None}, max_steps=10)),
        store.get(tenant_id, "d"),
    )


def test_two_registrations_at_once_take_two_versions_each_with_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the same MAX(version) before either wrote: the second deleted the first's committed folder, moved its
    own in and failed on the row, so the row named one registration's base and the files were the other's (second
    reader). Here A's check waits until B's has begun; B's until A has finished."""
    root = tmp_path / "root"
    tenant_root(root)
    sources = {}
    for who in ("A", "B"):
        sources[who] = tmp_path / who
        sources[who].mkdir()
        (sources[who] / tenants.WEIGHTS_NAME).write_text(f"weights of {who}")
        (sources[who] / tenants.CONFIG_NAME).write_text(f"config of {who}")
    meta = SimpleNamespace(method={"method": "lora-pe"}, num_classes=2, classes=[], weights_sha256=None)
    monkeypatch.setattr(tenants, "adapter_dir", Path)
    monkeypatch.setattr(tenants, "read_adapter_meta", lambda folder: meta)
    monkeypatch.setattr(tenants, "adapter_files", lambda p: (p / tenants.CONFIG_NAME, p / tenants.WEIGHTS_NAME))
    b_checking, a_done = threading.Event(), threading.Event()

    def check_routable(folder: Path, weights: str) -> None:  # the slow part: the base built, the adapter probed
        if weights.endswith("A"):
            assert b_checking.wait(10)
        else:
            b_checking.set()
            assert a_done.wait(10)

    monkeypatch.setattr(tenants, "check_routable", check_routable)
    results: dict[str, object] = {}

    def register(who: str) -> None:
        try:
            results[who] = TenantStore(root).set_adapter("eve", sources[who], weights=f"/base-{who}")
        except Exception as exc:
            results[who] = exc
        finally:
            if who == "A":
                a_done.set()

    threads = [threading.Thread(target=register, args=(who,)) for who in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {"A": 2, "B": 3}
    with service_db(root) as con:
        rows = con.execute(
            "SELECT version, folder, weights FROM adapters WHERE version > 1 ORDER BY version"
        ).fetchall()
    for (version, folder, weights), who in zip(rows, "AB", strict=True):
        assert (version, weights) == ({"A": 2, "B": 3}[who], f"/base-{who}")
        assert (root / folder / tenants.WEIGHTS_NAME).read_text() == f"weights of {who}"
    assert not list((root / "adapters" / "eve").glob(".new.*"))  # no staged copy left behind


def test_a_job_is_not_queued_on_a_dataset_deleted_or_declared_again_since_it_was_read(tmp_path: Path) -> None:
    """POST /v1/jobs read the dataset, then inserted the job without looking again, while DELETE checked for jobs and
    deleted in two transactions: a job could be queued on a deleted dataset, or on one declared again under its name
    with other shards, which its step bound never counted (second reader)."""
    tenant_id, store, jobs, read = a_dataset_read(tmp_path, 2)
    store.delete(tenant_id, "d")  # the delete lands meanwhile
    with pytest.raises(JobError, match=r"^dataset d: deleted or declared again meanwhile; submit again$") as refused:
        jobs.submit(tenant_id, read, {"epochs": 1, "batch_size": 2}, False)
    assert refused.value.status == 409
    store.declare(tenant_id, "d", MANIFEST, shards(1))  # declared again, other shards
    received(tmp_path, tenant_id, "d")
    with pytest.raises(JobError, match="declared again meanwhile"):
        jobs.submit(tenant_id, read, {"epochs": 1, "batch_size": 2}, False)
    job = jobs.submit(tenant_id, store.get(tenant_id, "d"), {"epochs": 1, "batch_size": 2}, False)
    assert job["state"] == "queued"
    with pytest.raises(ValueError, match=r"^dataset d: a queued or running job uses it$"):
        store.delete(tenant_id, "d")


def test_a_delete_killed_after_its_commit_leaves_nothing_a_new_declaration_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its row was deleted, then its folder: a process killed between the two left the shards, and the same name
    declared again trained on them beside its own (second reader). Now the folder is renamed in the transaction
    that deletes the row; what a kill leaves of it, and of a shard being received, goes when the next server opens
    the store; a folder no row names (an older release's) is cleared by the next declaration of its name."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    store.declare(tenant_id, "d", MANIFEST, shards(2))
    received(tmp_path, tenant_id, "d")

    def killed(path: Path, ignore_errors: bool = False) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.delete(tenant_id, "d")
    monkeypatch.undo()
    (trash,) = (tmp_path / "datasets" / str(tenant_id)).glob(TRASH + "*")
    again = store.declare(tenant_id, "d", MANIFEST, shards(1))
    assert EncryptedWds(again.folder).shard_files("train") == []  # its one shard not sent yet; neither of the 2
    partial = again.folder / "train" / ".shard-000000.tar.5dko7_sb.tmp"  # arriving when the server died
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a shard")
    DatasetStore(tmp_path).sweep()  # the next server's
    assert not trash.exists() and not partial.exists()
    received(tmp_path, tenant_id, "d")
    with service_db(tmp_path) as con:  # an older release's delete, killed after its commit
        con.execute("DELETE FROM datasets WHERE tenant_id = ? AND name = 'd'", (tenant_id,))
    assert EncryptedWds(store.declare(tenant_id, "d", MANIFEST, shards(2)).folder).shard_files("train") == []


def test_a_delete_whose_commit_fails_keeps_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is renamed inside the delete's transaction: a commit that fails (a full disk) brought the row
    back but not the files, and the next server swept them (second reader). They are named back now."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    store.declare(tenant_id, "d", MANIFEST, shards(1))
    received(tmp_path, tenant_id, "d")
    real = datasets.service_db

    @contextmanager
    def commit_fails(root: Path) -> Iterator[sqlite3.Connection]:
        with real(root) as con:
            yield con
            if con.total_changes:  # the delete's transaction, not get's read
                raise datasets.DatasetError(507, "tenants.sqlite: database or disk is full")

    monkeypatch.setattr(datasets, "service_db", commit_fails)
    with pytest.raises(datasets.DatasetError, match="disk is full"):
        store.delete(tenant_id, "d")
    monkeypatch.undo()
    DatasetStore(tmp_path).sweep()
    kept = store.get(tenant_id, "d")
    assert kept.complete and (kept.folder / "train" / "shard-000000.tar").exists()


def test_a_registration_during_a_removal_leaves_no_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal deletes the files, then the rows: a version registered in between (the CLI's, a finished job's)
    kept its folder after the rows went (second reader). The rows go with a second look at the folders now."""
    root = tmp_path / "root"
    tenant_root(root)
    monkeypatch.setattr(TenantStore, "_stage", staged_copy)
    rmtree = tenants.shutil.rmtree
    registered = []

    def between(path: Path, *args: object, **kwargs: object) -> None:
        rmtree(path, *args, **kwargs)
        if Path(path) == root / "adapters" / "eve" and not registered:  # the files gone, the rows next
            registered.append(TenantStore(root).set_adapter("eve", tmp_path / "src"))

    monkeypatch.setattr(tenants.shutil, "rmtree", between)
    TenantStore(root).remove("eve")
    assert registered == [2] and TenantStore(root).list() == []
    assert [p for p in (root / "adapters").rglob("*")] == []


def test_a_shard_is_received_for_the_declaration_it_was_checked_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard's file went into place, then the dataset was deleted and declared again with the same shards, then
    the upload marked the new declaration's row done: complete, with no file (third reader)."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    data = b"x" * 100
    shard = [{"path": "train/shard-000000.tar", "bytes": 100, "sha256": hashlib.sha256(data).hexdigest()}]
    store.declare(tenant_id, "d", MANIFEST, shard)
    monkeypatch.setattr(datasets, "check_shard", lambda path, size: 10)
    commit = datasets.commit_temp

    def then_declared_again(tmp: Path, target: Path, mode: int) -> None:
        commit(tmp, target, mode)
        store.delete(tenant_id, "d")  # another request of the tenant, between the file and its row
        store.declare(tenant_id, "d", MANIFEST, shard)

    monkeypatch.setattr(datasets, "commit_temp", then_declared_again)

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    asyncio.run(store.receive(tenant_id, "d", "train/shard-000000.tar", chunks()))
    assert store.get(tenant_id, "d").missing == ["train/shard-000000.tar"]  # sent again, then kept


def test_a_job_submitted_as_the_tenant_is_removed_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job request let in before the token's revoke could land after remove-tenant's last look at the jobs: its
    row went with the tenant's, its folder stayed (third reader). The last look deletes the datasets' rows in its
    own transaction: a job later than it is refused (its dataset gone)."""
    tenant_id, _, jobs, read = a_dataset_read(tmp_path, 1)
    rmtree, late = supervisor.shutil.rmtree, []

    def meanwhile(path: Path, *args: object, **kwargs: object) -> None:
        if not late:  # the files being deleted: the request's transaction lands now
            with pytest.raises(JobError, match="deleted or declared again meanwhile") as refused:
                jobs.submit(tenant_id, read, {"epochs": 1, "batch_size": 2}, False)
            late.append(refused.value.status)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(supervisor.shutil, "rmtree", meanwhile)
    supervisor.remove_tenant(tmp_path, "eve", wait_s=1.0)
    assert late == [409] and not any((tmp_path / "jobs").glob("*"))


def test_a_declaration_cannot_write_its_manifest_over_a_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A declared "d" and committed; B deleted it and C declared "d" again with other content; then A wrote its
    manifest, outside the lock, over C's: C's row, A's manifest, and a job on "d" built from the wrong one (second
    reader). The manifest is now written in the declaration's own transaction: C's lands after A's, whole."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    other = {**MANIFEST, "classes": {"train": ["x", "y"]}}
    write, meanwhile = datasets.atomic_write_bytes, []

    def then(path: Path, data: bytes, mode: int) -> None:
        if not meanwhile:  # A's manifest: B and C, as other requests, from now on
            thread = threading.Thread(
                target=lambda: (store.delete(tenant_id, "d"), store.declare(tenant_id, "d", other, shards(2)))
            )
            meanwhile.append(thread)
            thread.start()
            thread.join(2.0)  # done by now, unless they wait for A's lock
        write(path, data, mode)

    monkeypatch.setattr(datasets, "atomic_write_bytes", then)
    store.declare(tenant_id, "d", MANIFEST, shards(1))
    meanwhile[0].join()
    kept = store.get(tenant_id, "d")
    assert kept.manifest.classes == {"train": ["x", "y"]} and len(kept.missing) == 2  # C's row
    on_disk = json.loads((kept.folder / datasets.MANIFEST_NAME).read_text())
    assert on_disk["classes"] == {"train": ["x", "y"]}  # and C's manifest


def test_a_declaration_landing_during_a_removal_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A declaration let in before remove-tenant's revoke and committed after its rmtree of the datasets (the tenant's
    row still there) kept its folder and manifest for good once the row went with the tenant's."""
    tenant_id, _ = tenant_root(tmp_path)
    remove, late = TenantStore.remove, []

    def after_the_files(self: TenantStore, name: str) -> None:
        late.append(DatasetStore(tmp_path).declare(tenant_id, "d", MANIFEST, shards(1)).name)
        remove(self, name)

    monkeypatch.setattr(TenantStore, "remove", after_the_files)
    supervisor.remove_tenant(tmp_path, "eve", wait_s=1.0)
    assert late == ["d"] and not (tmp_path / "datasets" / str(tenant_id)).exists()


def test_a_shard_arriving_for_a_removed_tenant_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard upload that read its declaration before remove-tenant's last round and made its folder after the
    removal's rmtree wrote the whole shard into a folder no row names: disk outside any quota, for good."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    data = b"x" * 100
    store.declare(tenant_id, "d", MANIFEST, [{"path": "train/shard-000000.tar", "bytes": 100,
                                              "sha256": hashlib.sha256(data).hexdigest()}])  # fmt: skip
    monkeypatch.setattr(datasets, "check_shard", lambda path, size: 10)
    write = datasets.private_dirs

    def after_the_removal(folder: Path) -> None:
        supervisor.remove_tenant(tmp_path, "eve", wait_s=1.0)
        write(folder)

    monkeypatch.setattr(datasets, "private_dirs", after_the_removal)

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    with pytest.raises(datasets.DatasetError, match=r"deleted while shard train/shard-000000\.tar arrived"):
        asyncio.run(store.receive(tenant_id, "d", "train/shard-000000.tar", chunks()))
    assert not (tmp_path / "datasets" / str(tenant_id)).exists()


def test_a_declaration_that_cannot_be_stored_keeps_no_row_and_no_leftover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Declared over a folder no row names (an older release's), the new declaration moved it aside, then failed
    to write its manifest (a full disk): the moved folder stayed on the full disk until the next start (third
    reader). It goes whatever the declaration's end; nothing is recorded."""
    tenant_id, _ = tenant_root(tmp_path)
    old = tmp_path / "datasets" / str(tenant_id) / "d"
    old.mkdir(parents=True)
    (old / "big").write_bytes(b"x" * 1000)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "atomic_write_bytes", full)
    with pytest.raises(datasets.DatasetError, match="cannot be stored") as refused:
        DatasetStore(tmp_path).declare(tenant_id, "d", MANIFEST, shards(1))
    assert refused.value.status == 507
    assert [p.name for p in old.parent.iterdir() if p.name.startswith(TRASH)] == []
    with service_db(tmp_path) as con:
        assert con.execute("SELECT COUNT(*) FROM datasets").fetchone()[0] == 0


def one_shard(store: DatasetStore, tenant_id: int, name: str, data: bytes) -> str:
    """Declare dataset ``name`` of one shard holding ``data``; its path."""
    path = "train/shard-000000.tar"
    store.declare(tenant_id, name, MANIFEST, [{"path": path, "bytes": len(data), "sha256": sha256(data)}])
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def sent(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def held(data: bytes, holding: asyncio.Event, go: asyncio.Event, end: str) -> AsyncIterator[bytes]:
    """``data``'s first half, then (once ``go`` is set) its end: the rest, other bytes, or the client gone."""
    yield data[: len(data) // 2]
    holding.set()
    await go.wait()
    if end == "client leaves":
        raise ClientDisconnect
    yield data[len(data) // 2 :] if end == "arrives" else b"y" * (len(data) - len(data) // 2)


@pytest.mark.parametrize("end", ["arrives", "cancelled", "client leaves", "bad bytes"])
def test_one_upload_of_a_shard_at_a_time_whichever_way_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """Each upload of a shard streamed into its own temporary file: 40 at once held 40 times its declared bytes on
    disk, past the quota (hostile tenants 3). A second one is 409 while the first is in flight (the dataset's name in
    another case is the same dataset); the shard can be sent once that one ended, by a timeout (a cancel) or not."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    data = b"x" * 100
    path = one_shard(store, tenant_id, "d", data)
    monkeypatch.setattr(datasets, "check_shard", lambda path, size: 10)

    async def uploads() -> None:
        holding, go = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(store.receive(tenant_id, "d", path, held(data, holding, go, end)))
        await holding.wait()
        with pytest.raises(datasets.DatasetError, match=r"shard train/shard-000000\.tar: being uploaded") as err:
            await store.receive(tenant_id, "D", path, sent(data))
        assert err.value.status == 409
        if end == "cancelled":
            first.cancel()
        go.set()
        await asyncio.gather(first, return_exceptions=True)
        await store.receive(tenant_id, "d", path, sent(data))

    asyncio.run(uploads())
    dataset = store.get(tenant_id, "d")
    assert dataset.complete and [p.name for p in (dataset.folder / "train").iterdir()] == ["shard-000000.tar"]


def test_uploads_in_flight_hold_at_most_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset deleted while its shard arrives no longer counts against the quota, but its upload goes on: declared
    again under new names, uploads held without end would each hold a quota's bytes. Those in flight hold at most it."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path, datasets.DatasetLimits(quota_bytes=150))
    data = b"x" * 100
    path = one_shard(store, tenant_id, "a", data)
    monkeypatch.setattr(datasets, "check_shard", lambda path, size: 10)

    async def uploads() -> None:
        holding, go = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(store.receive(tenant_id, "a", path, held(data, holding, go, "arrives")))
        await holding.wait()
        store.delete(tenant_id, "a")
        one_shard(store, tenant_id, "b", data)
        with pytest.raises(datasets.DatasetError, match="uploads in flight hold 100 bytes of the 150-byte") as err:
            await store.receive(tenant_id, "b", path, sent(data))
        assert err.value.status == 429
        go.set()
        await asyncio.gather(first, return_exceptions=True)
        await store.receive(tenant_id, "b", path, sent(data))

    asyncio.run(uploads())
    assert store.get(tenant_id, "b").complete and [d.name for d in store.list(tenant_id)] == ["b"]


def test_a_declaration_for_a_tenant_removed_after_its_token_was_checked_is_a_409(tmp_path: Path) -> None:
    """The token checked, then remove-tenant, then the declaration's insert: "FOREIGN KEY constraint failed" was
    answered 503, as if the server were at fault (hostile tester, session 21)."""
    tenant_id, _ = tenant_root(tmp_path)
    TenantStore(tmp_path).remove("eve")
    with pytest.raises(datasets.DatasetError, match="removed meanwhile") as refused:
        DatasetStore(tmp_path).declare(tenant_id, "d", MANIFEST, shards(1))
    assert refused.value.status == 409
    with service_db(tmp_path) as con:
        assert con.execute("SELECT COUNT(*) FROM datasets").fetchone() == (0,)


def test_a_shard_upload_waiting_for_the_database_lock_does_not_stall_other_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's reads and writes of the database ran on the event loop: while another request's transaction held
    the write lock (up to the 30 s timeout), every tenant's requests, predictions too, waited (session 21's note)."""
    tenant_id, _ = tenant_root(tmp_path)
    store = DatasetStore(tmp_path)
    data = b"x" * 100
    path = one_shard(store, tenant_id, "d", data)
    monkeypatch.setattr(datasets, "check_shard", lambda path, size: 10)
    locked, release = threading.Event(), threading.Event()

    def writer() -> None:  # another request's transaction, as a declaration's in its thread
        with service_db(tmp_path):
            locked.set()
            release.wait(10)

    async def meanwhile() -> None:
        upload = asyncio.create_task(store.receive(tenant_id, "d", path, sent(data)))
        for _ in range(10):  # the loop's other work, 0.5 s of it, while the lock is held; then the writer ends
            await asyncio.sleep(0.05)
        release.set()
        await upload

    holder = threading.Thread(target=writer)
    holder.start()
    locked.wait(10)
    started = time.monotonic()
    asyncio.run(meanwhile())
    holder.join()
    assert time.monotonic() - started < 5  # the ticks ran while the upload waited, not after the lock was released
    assert store.get(tenant_id, "d").complete
