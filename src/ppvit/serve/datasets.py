"""The server's store of uploaded encrypted datasets: WebDataset shards a tenant trains on, never sees plain.

A client declares a dataset (``ppvit encrypt --format wds`` output: its manifest and every
shard's size and SHA-256), then sends the shards one by one. Each shard is streamed to a
temporary file, hashed as it arrives and renamed into place only when its size and hash are
the declared ones, and only when its tar headers say it holds what ``ppvit encrypt`` writes
(a plain tar of PNGs of the manifest's size and their labels: :func:`check_shard`, nothing
decompressed, no member read whole), whose PNGs the server counts itself: a job's steps come
from that count, never from the client's manifest. A declaration repeated with the same
content answers with the shards still missing, so an interrupted upload resumes where it
stopped. A tenant's declared bytes count against its quota at declaration (nothing is
half-admitted); its datasets, the shards of one and its class names are bounded
(:class:`DatasetLimits`).

Records live in the tenant store's SQLite (``tenants.sqlite``), in tables added beside the
tenants' (``CREATE TABLE IF NOT EXISTS``: a store of an earlier release gains them on first
use and keeps working with that release). Files: ``ROOT/datasets/<tenant id>/<name>/``, the
layout ``ppvit train --data`` reads (manifest plus ``<split>/shard-NNNNNN.tar``). The manifest
records the scheme, block size, input size and key fingerprint: the fingerprint is what ties a
later job and its adapter to the client's key, which the server never holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppvit._io import atomic_write_bytes, commit_temp, json_text, remove_stale_temps
from ppvit._schema import lone_surrogate
from ppvit.data.manifest import MANIFEST_NAME, Manifest
from ppvit.data.sources.encrypted_wds import check_shard
from ppvit.serve.declarations import SHARD_PATH, DatasetLimits, ShardSpec, check_name, parse_manifest, parse_shards
from ppvit.serve.service_db import ACTIVE, DatasetError, service_db

DATASETS_DIR = "datasets"


TRASH = ".deleted-"  # a deleted dataset's folder, renamed so in the transaction that deletes its row


def _discard(folder: Path) -> Path | None:
    """Rename ``folder`` out of the way (``.deleted-*`` beside it, deleted later or when a store opens); None if
    there is none. Within a transaction: the name is free for a new declaration the moment its row is gone."""
    trash = folder.with_name(TRASH + secrets.token_hex(4))
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return None
    return trash


@dataclass(frozen=True)
class Dataset:
    """One tenant's dataset as recorded; ``missing``: shards not yet received; ``counts``: the PNGs
    per split the server counted in the shards received (not the manifest's word)."""

    name: str
    folder: Path
    manifest: Manifest
    bytes: int
    missing: list[str]
    counts: dict[str, int]
    declared: float = 0.0  # when (``time.time()``): a job checks it is queued on this declaration, not a later one

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self, classes: bool = True) -> dict[str, Any]:
        """What the tenant sees of it (``classes``: with the class lists; a listing leaves them out)."""
        m = self.manifest
        return {
            "name": self.name,
            "scheme": m.scheme,
            "block_size": m.block_size,
            "input_size": m.size,
            "key_fingerprint": m.key_fingerprint,
            **({"classes": m.classes} if classes else {}),
            "counts": self.counts,
            "bytes": self.bytes,
            "complete": self.complete,
            "missing": self.missing,
        }

    def check_counts(self) -> None:
        """A complete dataset's manifest counts are the server's count of its shards (422 otherwise)."""
        for split in sorted({*self.manifest.counts, *self.counts}):
            said, held = self.manifest.counts.get(split, 0), self.counts.get(split, 0)
            if said != held:
                raise DatasetError(
                    422, f"dataset {self.name}: its manifest says {said} {split} images, its shards hold {held}"
                )


class DatasetStore:
    """The datasets of one server root, per tenant (a tenant's requests never name another's rows)."""

    def __init__(self, root: str | os.PathLike, limits: DatasetLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or DatasetLimits()
        # Shards being received, (tenant, dataset, path) -> declared bytes: one upload of a shard at a time, each into
        # its own temporary file, so N at once held N times the declared (and counted) bytes on disk. Touched on
        # the event loop only (receive is a coroutine), between awaits: no lock.
        self._receiving: dict[tuple[int, str, str], int] = {}

    def sweep(self) -> None:
        """Delete what a server that died left: the datasets it was deleting and the shards it was receiving.
        Called by the job service once it holds the folder (``sole_supervisor``): a second server refused there
        deleted the first one's shards in flight."""
        for trash in self.root.glob(f"{DATASETS_DIR}/*/{TRASH}*"):
            shutil.rmtree(trash, ignore_errors=True)
        remove_stale_temps(self.root / DATASETS_DIR)

    def folder(self, tenant_id: int, name: str) -> Path:
        return self.root / DATASETS_DIR / str(tenant_id) / name.lower()

    def declare(self, tenant_id: int, name: str, manifest_doc: Any, shards_doc: Any) -> Dataset:
        """Record a dataset (or find the same one again) and answer with the shards still missing.

        The same name with another manifest or shard list is refused (409): a dataset's content
        never changes under a job; delete it and declare again.
        """
        check_name(name)
        for part, doc in (("manifest", manifest_doc), ("shards", shards_doc)):
            where = lone_surrogate(doc)
            if where is not None:
                raise DatasetError(422, f"{part}: {where[:80]}: a lone UTF-16 surrogate, which is not text")
        manifest = parse_manifest(manifest_doc, self.limits)
        shards = parse_shards(shards_doc, self.limits.shards)
        if not any(s.path.startswith("train/") for s in shards):
            raise DatasetError(422, "shards: none of the train split")
        if not {s.path.partition("/")[0] for s in shards} <= set(manifest.classes):
            raise DatasetError(422, "shards: a split the manifest does not name")
        leftover: list[Path] = []
        try:
            with service_db(self.root) as con:
                self._record(con, tenant_id, name, manifest, shards, leftover)
                folder = self.folder(tenant_id, name)
                try:  # under the lock: a delete's rename, a later declaration's, come whole before or after it
                    private_dirs(folder)
                    atomic_write_bytes(folder / MANIFEST_NAME, json_text(manifest.shared()).encode(), mode=0o600)
                except OSError as exc:  # a full disk: nothing is recorded
                    raise DatasetError(507, f"dataset {name}: cannot be stored ({exc.strerror or exc})") from None
        finally:  # after the commit, not while every writer waits for the lock; no row names it either way
            for trash in leftover:
                shutil.rmtree(trash, ignore_errors=True)
        return self.get(tenant_id, name)

    def _record(
        self,
        con: sqlite3.Connection,
        tenant_id: int,
        name: str,
        manifest: Manifest,
        shards: list[ShardSpec],
        leftover: list[Path],
    ) -> None:
        """The declaration's rows, in the caller's transaction: the same one again is found, another under the
        name refused (409), a new one counted against the tenant's bounds; a folder no row names (an older
        release's) is moved aside into ``leftover``."""
        doc = json.dumps(manifest.shared(), sort_keys=True)
        total = sum(s.bytes for s in shards)
        row = con.execute(
            "SELECT manifest FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, name)
        ).fetchone()
        if row is not None:
            have = set(
                con.execute(
                    "SELECT path, bytes, sha256 FROM shards WHERE tenant_id = ? AND dataset = ?", (tenant_id, name)
                )
            )
            if row[0] != doc or have != {(s.path, s.bytes, s.sha256) for s in shards}:
                raise DatasetError(409, f"dataset {name}: exists with other content; delete it or use a new name")
            return
        n, used = con.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM datasets WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        quota = self.limits.quota_bytes
        if n >= self.limits.datasets:
            raise DatasetError(429, f"dataset {name}: the tenant holds {n} datasets, this server's most")
        if used + total > quota:
            raise DatasetError(413, f"dataset {name}: {total} bytes; the tenant holds {used} of its {quota}-byte quota")
        trash = _discard(self.folder(tenant_id, name))
        if trash is not None:
            leftover.append(trash)
        con.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?)", (tenant_id, name, doc, total, time.time()))
        con.executemany(
            "INSERT INTO shards (tenant_id, dataset, path, bytes, sha256) VALUES (?, ?, ?, ?, ?)",
            [(tenant_id, name, s.path, s.bytes, s.sha256) for s in shards],
        )

    def _gone(self, tenant_id: int, name: str) -> bool:
        """Whether the dataset has no row any more; if so, its folder goes (a shard written outside the lock by
        a request that read the row before a delete or its tenant's removal landed would stay with no owner)."""
        folder = self.folder(tenant_id, name)
        with service_db(self.root) as con:
            if con.execute("SELECT 1 FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, name)).fetchone():
                return False
            trash = _discard(folder)
            owner = con.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        if owner is None:  # no declaration of a removed tenant can follow
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
        return True

    def get(self, tenant_id: int, name: str) -> Dataset:
        """The tenant's dataset ``name``; 404 when it has none of that name (another tenant's included)."""
        check_name(name)
        with service_db(self.root) as con:
            row = con.execute(
                "SELECT name, manifest, bytes, created FROM datasets WHERE tenant_id = ? AND name = ?",
                (tenant_id, name),
            ).fetchone()
            if row is None:
                raise DatasetError(404, f"no dataset {name}")
            shards = con.execute(
                "SELECT path, done, images FROM shards WHERE tenant_id = ? AND dataset = ? ORDER BY path",
                (tenant_id, name),
            ).fetchall()
        manifest = Manifest(**json.loads(row[1]))
        if any(done and images is None for _, done, images in shards):  # received before the server counted
            shards = self._count(tenant_id, row[0], shards, manifest.size)
        counts: dict[str, int] = {}
        for path, done, images in shards:
            if done:
                split = path.partition("/")[0]
                counts[split] = counts.get(split, 0) + (images or 0)
        missing = [path for path, done, _ in shards if not done]
        return Dataset(row[0], self.folder(tenant_id, row[0]), manifest, row[2], missing, counts, row[3])

    def _count(self, tenant_id: int, name: str, shards: list[tuple], size: int) -> list[tuple]:
        """Shards an earlier release stored without counting: counted now, or missing again when
        :func:`check_shard` refuses them (the client sends them again and reads why)."""
        out = []
        for path, done, images in shards:
            if done and images is None:
                try:
                    images = check_shard(self.folder(tenant_id, name) / path, size)
                except (ValueError, OSError):
                    done = 0
                with service_db(self.root) as con:
                    con.execute(
                        "UPDATE shards SET done = ?, images = ? WHERE tenant_id = ? AND dataset = ? AND path = ?",
                        (done, images, tenant_id, name, path),
                    )
            out.append((path, done, images))
        return out

    def list(self, tenant_id: int) -> list[Dataset]:
        with service_db(self.root) as con:
            rows = con.execute("SELECT name FROM datasets WHERE tenant_id = ? ORDER BY name", (tenant_id,))
            names = [r[0] for r in rows]
        return [self.get(tenant_id, n) for n in names]

    def delete(self, tenant_id: int, name: str) -> None:
        """Forget the dataset and its files; 409 while a queued or running job uses it. The check, the row
        and the folder's rename go in one transaction (a job submitted meanwhile waits for it, and then finds
        no dataset; a dataset declared again gets a folder of its own); the renamed folder is deleted after,
        or named back where the transaction failed to commit (its row is back: so are its files)."""
        dataset = self.get(tenant_id, name)
        trash = None
        try:
            with service_db(self.root) as con:
                if con.execute(
                    "SELECT 1 FROM jobs WHERE tenant_id = ? AND dataset = ? AND state IN (?, ?)",
                    (tenant_id, dataset.name, *ACTIVE),
                ).fetchone():
                    raise DatasetError(409, f"dataset {name}: a queued or running job uses it")
                con.execute("DELETE FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, dataset.name))
                trash = _discard(dataset.folder)
        except BaseException:
            if trash is not None:
                with contextlib.suppress(OSError):
                    os.rename(trash, dataset.folder)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    async def receive(self, tenant_id: int, name: str, path: str, chunks: AsyncIterator[bytes]) -> None:
        """Stream one declared shard to disk; kept only if its size and SHA-256 are the declared ones
        and :func:`check_shard` finds what ``ppvit encrypt`` writes (its PNGs counted then)."""
        check_name(name)
        if not SHARD_PATH.fullmatch(path):
            raise DatasetError(404, f"shard path {path[:80]!r}: not SPLIT/shard-NNNNNN.tar")
        # the database in a thread, as every route's: a writer holding its lock (up to 30 s) stalls this request only
        row = await asyncio.to_thread(self._declared, tenant_id, name, path)
        size, _, done, _, _ = row
        if done:
            return  # a retry after an answer that was lost: already here
        key = (tenant_id, name.lower(), path)
        if key in self._receiving:
            raise DatasetError(
                409, f"shard {path}: being uploaded by another request; send it again when that one ends"
            )
        held = sum(n for (tenant, _, _), n in self._receiving.items() if tenant == tenant_id)
        if held + size > self.limits.quota_bytes:  # a deleted dataset's uploads still arriving: no longer counted
            raise DatasetError(
                429,
                f"shard {path}: uploads in flight hold {held} bytes of the {self.limits.quota_bytes}-byte quota; "
                "send it again when they end",
            )
        self._receiving[key] = size
        try:
            await self._write(tenant_id, name, path, row, chunks)
        finally:
            del self._receiving[key]

    def _declared(self, tenant_id: int, name: str, path: str) -> tuple:
        """The shard's declaration (bytes, sha256, done) with its dataset's (manifest, created); 404 without one."""
        with service_db(self.root) as con:
            row = con.execute(
                "SELECT s.bytes, s.sha256, s.done, d.manifest, d.created FROM shards s JOIN datasets d "
                "ON d.tenant_id = s.tenant_id AND d.name = s.dataset "
                "WHERE s.tenant_id = ? AND s.dataset = ? AND s.path = ?",
                (tenant_id, name, path),
            ).fetchone()
        if row is None:
            self.get(tenant_id, name)  # 404 for the dataset first
            raise DatasetError(404, f"dataset {name}: no shard {path} was declared")
        return row

    async def _write(self, tenant_id: int, name: str, path: str, row: tuple, chunks: AsyncIterator[bytes]) -> None:
        """:meth:`receive`'s file and row, once it holds the shard: the body streamed to a temporary file, checked,
        moved into place and marked done for the declaration ``row`` was read from."""
        size, digest, _, manifest, declared = row
        target = self.folder(tenant_id, name) / path
        h, n = hashlib.sha256(), 0
        try:
            private_dirs(target.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise DatasetError(507, f"shard {path}: cannot be stored ({exc.strerror or exc})") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    n += len(chunk)
                    if n > size:
                        raise DatasetError(413, f"shard {path}: more than the {size} bytes declared")
                    h.update(chunk)
                    fh.write(chunk)
            if n != size:
                raise DatasetError(400, f"shard {path}: {n} bytes arrived, {size} were declared; send it again")
            if h.hexdigest() != digest:
                raise DatasetError(400, f"shard {path}: SHA-256 differs from the declared one; send it again")
            try:
                images = await asyncio.to_thread(check_shard, tmp, json.loads(manifest)["size"])
            except ValueError as exc:  # named by its path in the dataset, not the server's file
                raise DatasetError(422, str(exc).replace(str(tmp), path).replace(tmp.name, path)) from None
            commit_temp(tmp, target, 0o600)
        except OSError as exc:  # a full disk fails this upload, not the server
            tmp.unlink(missing_ok=True)
            raise DatasetError(507, f"shard {path}: cannot be stored ({exc.strerror or exc})") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(self._mark_done, tenant_id, name, path, images, declared)

    def _mark_done(self, tenant_id: int, name: str, path: str, images: int, declared: float) -> None:
        """The received shard's row marked done, for the declaration it was checked against (``declared``: when)."""
        with service_db(self.root) as con:
            marked = con.execute(
                "UPDATE shards SET done = 1, images = ? WHERE tenant_id = ? AND dataset = ? AND path = ? AND EXISTS "
                "(SELECT 1 FROM datasets WHERE tenant_id = ? AND name = ? AND created = ?)",  # not a later declaration
                (images, tenant_id, name, path, tenant_id, name, declared),
            ).rowcount
        if not marked and self._gone(tenant_id, name):
            raise DatasetError(404, f"no dataset {name}: deleted while shard {path} arrived")


def private_dirs(folder: Path) -> None:
    """``folder`` and every missing folder above it, each 0700 (``mkdir(parents=True)`` gives the
    parents the umask's mode)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by a request at the same moment
            path.mkdir(mode=0o700)
        if not path.is_dir():
            raise OSError(errno.ENOTDIR, "not a folder", str(path))
