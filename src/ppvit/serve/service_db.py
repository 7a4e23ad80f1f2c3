"""The service's tables (datasets, shards, jobs) in the tenant store's SQLite, and the one way to open a
transaction on them (:func:`service_db`), shared by the datasets, the jobs and their supervisor."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ppvit.serve.tenants import DB_NAME

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
    images INTEGER,                  -- PNGs the server counted in it on arrival
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
    devices TEXT,                    -- the slots it runs on, comma-separated ("cpu", or CUDA indices)
    error TEXT,
    version INTEGER,                 -- the adapter version registered on success
    cancel INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    ended REAL
);
"""

ADDED_COLUMNS = {  # columns later than their table: (table, column) -> its definition, added to older stores
    ("jobs", "processes"): "INTEGER NOT NULL DEFAULT 1",
    ("shards", "images"): "INTEGER",
    ("jobs", "devices"): "TEXT",  # the slots a running job holds, comma-separated: a restarted server keeps them
}

ACTIVE = ("queued", "running")  # the states of a job that still holds its dataset


class DatasetError(ValueError):
    """A refused request of the service's store (a dataset's, or its database's); ``status``: the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def service_db(root: Path) -> Iterator[sqlite3.Connection]:
    """One transaction on the store's database, the service's tables created if missing.

    Taken with the write lock from its start (``BEGIN IMMEDIATE``): a count and the insert it
    allows (a quota, a tenant's jobs) cannot interleave with another request's. A database
    error is a :class:`DatasetError` naming the file, not its folder: 507 for a full disk, 409 for a row naming
    a tenant or dataset removed since the request was let in, else 503.
    """
    try:
        con = sqlite3.connect(root / DB_NAME, timeout=30)
    except sqlite3.Error as exc:
        raise DatasetError(503, f"{DB_NAME}: cannot be opened ({exc})") from None
    try:
        con.execute("PRAGMA foreign_keys=ON")
        con.executescript(SERVICE_SCHEMA)  # idempotent; runs in its own transaction
        for (table, column), definition in ADDED_COLUMNS.items():
            if column not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        with con:
            con.execute("BEGIN IMMEDIATE")
            yield con
    except sqlite3.IntegrityError as exc:
        if "FOREIGN KEY" not in str(exc):
            raise DatasetError(503, f"{DB_NAME}: {exc}") from None
        # a row naming a tenant (or dataset) removed after the request's token was checked: not the server's fault
        raise DatasetError(409, "the tenant or dataset of this request was removed meanwhile") from None
    except sqlite3.DatabaseError as exc:
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
        raise DatasetError(507 if full else 503, f"{DB_NAME}: {exc}") from None
    finally:
        con.close()
