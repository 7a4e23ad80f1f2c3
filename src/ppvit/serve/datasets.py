"""The server's store of uploaded encrypted datasets: WebDataset shards a tenant trains on, never sees plain.

A client declares a dataset (``ppvit encrypt --format wds`` output: its manifest and every
shard's size and SHA-256), then sends the shards one by one. Each shard is streamed to a
temporary file, hashed as it arrives and renamed into place only when its size and hash are
the declared ones; a declaration repeated with the same content answers with the shards
still missing, so an interrupted upload resumes where it stopped. A tenant's declared bytes
count against its quota at declaration (nothing is half-admitted).

Records live in the tenant store's SQLite (``tenants.sqlite``), in tables added beside the
tenants' (``CREATE TABLE IF NOT EXISTS``: a store of an earlier release gains them on first
use and keeps working with that release). Files: ``ROOT/datasets/<tenant id>/<name>/``, the
layout ``ppvit train --data`` reads (manifest plus ``<split>/shard-NNNNNN.tar``). The manifest
records the scheme, block size, input size and key fingerprint: the fingerprint is what ties a
later job and its adapter to the client's key, which the server never holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ppvit._io import atomic_write_json, commit_temp
from ppvit.data.manifest import MANIFEST_NAME, Manifest
from ppvit.serve.tenants import DB_NAME, NAME

DATASETS_DIR = "datasets"
SHARD_PATH = re.compile(r"[a-z0-9_]{1,32}/shard-[0-9]{6}\.tar")  # what `ppvit encrypt --format wds` writes
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SHARDS = 100_000  # shards in one declaration (a bound on the request, not on data)
SERVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name TEXT NOT NULL COLLATE NOCASE,
    manifest TEXT NOT NULL,          -- JSON, as ppvit encrypt wrote it (no key: a fingerprint)
    bytes INTEGER NOT NULL,          -- declared, counted against the quota
    created REAL NOT NULL,
    PRIMARY KEY (tenant_id, name)
);
CREATE TABLE IF NOT EXISTS shards (
    tenant_id INTEGER NOT NULL,
    dataset TEXT NOT NULL COLLATE NOCASE,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, dataset, path),
    FOREIGN KEY (tenant_id, dataset) REFERENCES datasets(tenant_id, name) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,             -- random: says nothing about other tenants' jobs
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    dataset TEXT NOT NULL,
    state TEXT NOT NULL,             -- queued, running, succeeded, failed, cancelled
    config TEXT NOT NULL,            -- the TrainConfig as config.yaml (the server's fields filled in)
    activate INTEGER NOT NULL,
    processes INTEGER NOT NULL DEFAULT 1,  -- training processes (torchrun when more than one)
    handle TEXT,                     -- the runner's name for the running process
    error TEXT,
    version INTEGER,                 -- the adapter version registered on success
    cancel INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    ended REAL
);
"""


class DatasetError(ValueError):
    """A refused dataset request; ``status`` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def service_db(root: Path) -> Iterator[sqlite3.Connection]:
    """One transaction on the store's database, the service's tables created if missing.

    Taken with the write lock from its start (``BEGIN IMMEDIATE``): a count and the insert it
    allows (a quota, a tenant's jobs) cannot interleave with another request's.
    """
    try:
        con = sqlite3.connect(root / DB_NAME, timeout=30)
    except sqlite3.Error as exc:
        raise ValueError(f"{root / DB_NAME}: cannot be opened ({exc})") from None
    try:
        con.execute("PRAGMA foreign_keys=ON")
        con.executescript(SERVICE_SCHEMA)  # idempotent; runs in its own transaction
        if "processes" not in {
            r[1] for r in con.execute("PRAGMA table_info(jobs)")
        }:  # a jobs table from before the column
            con.execute("ALTER TABLE jobs ADD COLUMN processes INTEGER NOT NULL DEFAULT 1")
        with con:
            con.execute("BEGIN IMMEDIATE")
            yield con
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{root / DB_NAME}: {exc}") from None
    finally:
        con.close()


@dataclass(frozen=True)
class ShardSpec:
    path: str  # "train/shard-000000.tar"
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """One tenant's dataset as recorded; ``missing``: shards not yet received."""

    name: str
    folder: Path
    manifest: Manifest
    bytes: int
    missing: list[str]

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": self.name,
            "scheme": m.scheme,
            "block_size": m.block_size,
            "input_size": m.size,
            "key_fingerprint": m.key_fingerprint,
            "classes": m.classes,
            "counts": m.counts,
            "bytes": self.bytes,
            "complete": self.complete,
            "missing": self.missing,
        }


def parse_manifest(doc: Any) -> Manifest:
    """A client's manifest: a finished WebDataset encryption with a scheme, a size and a fingerprint."""
    if not isinstance(doc, dict):
        raise DatasetError(422, "manifest: not a JSON object")
    try:
        m = Manifest(**doc)
    except (TypeError, ValueError) as exc:
        raise DatasetError(422, f"manifest: {exc}") from None
    if m.format != "wds":
        raise DatasetError(422, f"manifest: format {m.format!r}; upload `ppvit encrypt --format wds` output")
    if not m.complete:
        raise DatasetError(422, "manifest: the encryption did not finish (complete is false); run it again first")
    if m.scheme in (None, "", "none", "plain"):
        raise DatasetError(422, "manifest: plain images; the service trains on encrypted images only")
    if not (isinstance(m.size, int) and isinstance(m.block_size, int) and m.size > 0 and m.block_size > 0):
        raise DatasetError(422, "manifest: needs an input size and a block size (encrypt with --size)")
    if not (isinstance(m.key_fingerprint, str) and m.key_fingerprint):
        raise DatasetError(422, "manifest: no key fingerprint")
    if "train" not in m.classes:
        raise DatasetError(422, "manifest: no train split")
    return m


def parse_shards(doc: Any) -> list[ShardSpec]:
    if not isinstance(doc, list) or not doc or len(doc) > MAX_SHARDS:
        raise DatasetError(422, f"shards: a list of 1 to {MAX_SHARDS} {{path, bytes, sha256}} objects")
    out, seen = [], set()
    for item in doc:
        if not isinstance(item, dict) or set(item) != {"path", "bytes", "sha256"}:
            raise DatasetError(422, "shards: each one is {path, bytes, sha256}")
        path, size, digest = item["path"], item["bytes"], item["sha256"]
        if not (isinstance(path, str) and SHARD_PATH.fullmatch(path)):
            raise DatasetError(422, f"shard path {str(path)[:80]!r}: not SPLIT/shard-NNNNNN.tar")
        if not (type(size) is int and size > 0) or not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise DatasetError(422, f"shard {path}: bytes must be a positive integer, sha256 64 lowercase hex digits")
        if path in seen:
            raise DatasetError(422, f"shard {path}: listed twice")
        seen.add(path)
        out.append(ShardSpec(path, size, digest))
    return out


class DatasetStore:
    """The datasets of one server root, per tenant (a tenant's requests never name another's rows)."""

    def __init__(self, root: str | os.PathLike, quota_bytes: int) -> None:
        self.root = Path(root)
        self.quota_bytes = quota_bytes

    def folder(self, tenant_id: int, name: str) -> Path:
        return self.root / DATASETS_DIR / str(tenant_id) / name.lower()

    def declare(self, tenant_id: int, name: str, manifest_doc: Any, shards_doc: Any) -> Dataset:
        """Record a dataset (or find the same one again) and answer with the shards still missing.

        The same name with another manifest or shard list is refused (409): a dataset's content
        never changes under a job; delete it and declare again.
        """
        check_name(name)
        manifest = parse_manifest(manifest_doc)
        shards = parse_shards(shards_doc)
        if not any(s.path.startswith("train/") for s in shards):
            raise DatasetError(422, "shards: none of the train split")
        total = sum(s.bytes for s in shards)
        doc = json.dumps(asdict(manifest), sort_keys=True)
        with service_db(self.root) as con:
            row = con.execute(
                "SELECT manifest FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, name)
            ).fetchone()
            if row is not None:
                have = {
                    (p, b, h)
                    for p, b, h in con.execute(
                        "SELECT path, bytes, sha256 FROM shards WHERE tenant_id = ? AND dataset = ?", (tenant_id, name)
                    )
                }
                if row[0] != doc or have != {(s.path, s.bytes, s.sha256) for s in shards}:
                    raise DatasetError(409, f"dataset {name}: exists with other content; delete it or use a new name")
            else:
                used = con.execute("SELECT COALESCE(SUM(bytes), 0) FROM datasets WHERE tenant_id = ?", (tenant_id,))
                used = used.fetchone()[0]
                if used + total > self.quota_bytes:
                    raise DatasetError(
                        413,
                        f"dataset {name}: {total} bytes; the tenant holds {used} of its {self.quota_bytes}-byte quota",
                    )
                con.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?)", (tenant_id, name, doc, total, time.time()))
                con.executemany(
                    "INSERT INTO shards VALUES (?, ?, ?, ?, ?, 0)",
                    [(tenant_id, name, s.path, s.bytes, s.sha256) for s in shards],
                )
        folder = self.folder(tenant_id, name)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(folder / MANIFEST_NAME, asdict(manifest))
        return self.get(tenant_id, name)

    def get(self, tenant_id: int, name: str) -> Dataset:
        """The tenant's dataset ``name``; 404 when it has none of that name (another tenant's included)."""
        check_name(name)
        with service_db(self.root) as con:
            row = con.execute(
                "SELECT name, manifest, bytes FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, name)
            ).fetchone()
            if row is None:
                raise DatasetError(404, f"no dataset {name}")
            missing = [
                r[0]
                for r in con.execute(
                    "SELECT path FROM shards WHERE tenant_id = ? AND dataset = ? AND done = 0 ORDER BY path",
                    (tenant_id, name),
                )
            ]
        return Dataset(row[0], self.folder(tenant_id, row[0]), Manifest(**json.loads(row[1])), row[2], missing)

    def list(self, tenant_id: int) -> list[Dataset]:
        with service_db(self.root) as con:
            rows = con.execute("SELECT name FROM datasets WHERE tenant_id = ? ORDER BY name", (tenant_id,))
            names = [r[0] for r in rows]
        return [self.get(tenant_id, n) for n in names]

    def delete(self, tenant_id: int, name: str, busy: bool) -> None:
        """Forget the dataset and its files (``busy``: a job of the tenant still uses it: 409)."""
        dataset = self.get(tenant_id, name)
        if busy:
            raise DatasetError(409, f"dataset {name}: a queued or running job uses it")
        with service_db(self.root) as con:
            con.execute("DELETE FROM datasets WHERE tenant_id = ? AND name = ?", (tenant_id, dataset.name))
        shutil.rmtree(dataset.folder, ignore_errors=True)

    async def receive(self, tenant_id: int, name: str, path: str, chunks: AsyncIterator[bytes]) -> None:
        """Stream one declared shard to disk; kept only if its size and SHA-256 are the declared ones."""
        check_name(name)
        if not SHARD_PATH.fullmatch(path):
            raise DatasetError(404, f"shard path {path[:80]!r}: not SPLIT/shard-NNNNNN.tar")
        with service_db(self.root) as con:
            row = con.execute(
                "SELECT bytes, sha256, done FROM shards WHERE tenant_id = ? AND dataset = ? AND path = ?",
                (tenant_id, name, path),
            ).fetchone()
        if row is None:
            self.get(tenant_id, name)  # 404 for the dataset first
            raise DatasetError(404, f"dataset {name}: no shard {path} was declared")
        size, digest, done = row
        if done:
            return  # a retry after an answer that was lost: already here
        target = self.folder(tenant_id, name) / path
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        h, n = hashlib.sha256(), 0
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
            commit_temp(tmp, target, 0o600)
        except OSError as exc:  # a full disk fails this upload, not the server
            tmp.unlink(missing_ok=True)
            raise DatasetError(507, f"shard {path}: cannot be stored ({exc.strerror or exc})") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with service_db(self.root) as con:
            con.execute(
                "UPDATE shards SET done = 1 WHERE tenant_id = ? AND dataset = ? AND path = ?", (tenant_id, name, path)
            )


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise DatasetError(422, f"dataset name {name[:80]!r}: use 1-64 letters, digits, '_', '.', '-' (starting alnum)")
