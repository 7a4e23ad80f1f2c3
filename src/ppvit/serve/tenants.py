"""The server's tenants on disk: a SQLite registry and a private copy of every adapter version.

``ROOT/tenants.sqlite`` holds the tenants (name, the SHA-256 of their API token, the active
adapter version) and the adapter versions (folder, base weights file). ``ROOT/adapters/NAME/vK``
holds copies of the adapter folders, so a run folder can be deleted after registration and a
new version never changes an old one: requests in flight finish on the version they started
with. Tokens are 256-bit random (``secrets``), shown once, stored only as their hash.
The schema carries a version; a newer one than this code knows is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ppvit.models.adapters import CONFIG_NAME, WEIGHTS_NAME, build_base, file_sha256, read_adapter_meta
from ppvit.serve.routing import routed_adapter
from ppvit.train.config import TrainConfig
from ppvit.train.runs import adapter_dir

SCHEMA_VERSION = 1
DB_NAME = "tenants.sqlite"
TOKEN_PREFIX = "ppvit_"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a cached adapter cannot pass to a later tenant
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    token_sha256 TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    folder TEXT NOT NULL,
    weights TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (tenant_id, version)
);
"""


@dataclass(frozen=True)
class TenantAdapter:
    """What a request resolves to: the tenant and the adapter version it is served with."""

    tenant_id: int
    tenant: str
    version: int
    folder: Path
    weights: Path | None  # the base weights file (None: timm's download or a random-init base)

    @property
    def cache_key(self) -> tuple[int, int]:
        return self.tenant_id, self.version


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TenantStore:
    """Tenants of one server root; safe to use from the server and the CLI at once (SQLite WAL)."""

    def __init__(self, root: str | os.PathLike, create: bool = True) -> None:
        self.root = Path(root)
        self.db = self.root / DB_NAME
        if not self.db.exists():
            if not create:
                raise FileNotFoundError(f"server root {self.root}: no {DB_NAME} (add a tenant first)")
            self.root.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")  # readers (the server) and a writer (the CLI) at once
            con.executescript(SCHEMA)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise ValueError(f"{self.db}: schema version {row[0]} is newer than this ppvit's ({SCHEMA_VERSION})")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.db, timeout=30)
        except sqlite3.Error as exc:
            raise ValueError(f"{self.db}: cannot be opened ({exc})") from None
        try:
            con.execute("PRAGMA foreign_keys=ON")  # per connection; WAL is set once and kept by the file
            with con:  # one transaction: committed on success, rolled back on error
                yield con
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.db}: {exc}") from None
        finally:
            con.close()

    def add(self, name: str, adapter: str | os.PathLike, weights: str | os.PathLike | None = None) -> str:
        """Register ``name`` with a copy of ``adapter``; returns the API token (shown once, never stored)."""
        if not NAME.fullmatch(name):
            raise ValueError(f"tenant name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting alnum)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._connect() as con:
            if con.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():  # any case
                raise ValueError(f"tenant {name} exists already (remove-tenant first, or set-adapter)")
            cur = con.execute(
                "INSERT INTO tenants (name, token_sha256, version, created) VALUES (?, ?, 1, ?)",
                (name, hash_token(token), time.time()),
            )
            self._add_version(con, cur.lastrowid, name, 1, adapter, weights)
        return token

    def set_adapter(self, name: str, adapter: str | os.PathLike, weights: str | os.PathLike | None = None) -> int:
        """A new adapter version for ``name`` (the old one stays for requests already in flight)."""
        with self._connect() as con:
            row = con.execute("SELECT id, version FROM tenants WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ValueError(f"no tenant {name}")
            version = row[1] + 1
            self._add_version(con, row[0], name, version, adapter, weights)
            con.execute("UPDATE tenants SET version = ? WHERE id = ?", (version, row[0]))
        return version

    def _add_version(
        self,
        con: sqlite3.Connection,
        tenant_id: int,
        name: str,
        version: int,
        adapter: str | os.PathLike,
        weights: str | os.PathLike | None,
    ) -> None:
        src = adapter_dir(adapter)
        meta = read_adapter_meta(src)  # a clear error for what is not an adapter
        if meta.method.get("method") == "full":
            raise ValueError(f"adapter {src}: full fine-tuning replaces the whole backbone; it cannot be routed")
        if meta.weights_sha256 is not None:
            weights = weights or _run_weights(Path(adapter))
            if weights is None:
                raise ValueError(f"adapter {src}: trained on a local weights file; pass it with --weights")
            if file_sha256(weights) != meta.weights_sha256:
                raise ValueError(f"weights file {weights}: not the base this adapter was trained on (sha256 differs)")
        check_routable(src, weights)  # refused now rather than answered with 503 for ever
        folder = self.root / "adapters" / name / f"v{version}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.", dir=folder.parent))
        try:
            for file in (WEIGHTS_NAME, CONFIG_NAME):
                shutil.copy2(src / file, tmp / file)
            if folder.exists():  # left by a registration that failed after the copy
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        w = str(Path(weights).resolve()) if weights else None
        con.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?)", (tenant_id, version, str(folder), w, time.time()))

    def remove(self, name: str) -> None:
        with self._connect() as con:
            if con.execute("DELETE FROM tenants WHERE name = ?", (name,)).rowcount == 0:
                raise ValueError(f"no tenant {name}")
        shutil.rmtree(self.root / "adapters" / name, ignore_errors=True)

    def list(self) -> list[TenantAdapter]:
        with self._connect() as con:
            rows = con.execute(_ACTIVE + " ORDER BY t.name").fetchall()
        return [_tenant(r) for r in rows]

    def by_token(self, token: str) -> TenantAdapter | None:
        """The tenant whose token this is, with its active adapter version; None for an unknown token."""
        with self._connect() as con:
            row = con.execute(_ACTIVE + " WHERE t.token_sha256 = ?", (hash_token(token),)).fetchone()
        return None if row is None else _tenant(row)


def check_routable(adapter: Path, weights: str | os.PathLike | None) -> None:
    """Build the adapter's base and lay its tensors out for routing: every error a server would meet."""
    meta = read_adapter_meta(adapter)
    try:
        tensors = load_file(str(adapter / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"adapter weights {adapter / WEIGHTS_NAME}: cannot be read ({exc})") from None
    routed_adapter(meta, tensors, build_base(meta, weights))


def _run_weights(run: Path) -> str | None:
    """The weights file named by a run folder's config.yaml (what ``ppvit train --weights`` was given)."""
    config = run / "config.yaml"
    return TrainConfig.load(config).backbone.weights if config.exists() else None


_ACTIVE = (
    "SELECT t.id, t.name, t.version, a.folder, a.weights FROM tenants t "
    "JOIN adapters a ON a.tenant_id = t.id AND a.version = t.version"
)


def _tenant(row: tuple) -> TenantAdapter:
    return TenantAdapter(row[0], row[1], row[2], Path(row[3]), Path(row[4]) if row[4] else None)
