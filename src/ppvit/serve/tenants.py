"""The server's tenants on disk: a SQLite registry and a private copy of every adapter version.

``ROOT/tenants.sqlite`` holds the tenants (name, the SHA-256 of their API token, the active
adapter version) and the adapter versions (folder, base weights file). ``ROOT/adapters/NAME/vK``
holds copies of the adapter folders, so a run folder can be deleted after registration and a
new version never changes an old one: requests in flight finish on the version they started
with. Tokens are 256-bit random (``secrets``), shown once, stored only as their hash.
The schema carries a version; a newer one than this code knows is refused.

Adapter folders are recorded relative to ROOT (``adapters/NAME/vK``), so a server started from
any directory, or a root moved elsewhere, finds them; rows written by earlier releases (relative
to the directory registration ran in, or absolute) are read by their last three parts. The store
is private to the server's user: folders 0700, files 0600. Sources are copied without following
links and never from inside the store, by path or by inode (a hard link to a private copy), so one
tenant cannot register another's private copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ppvit._io import file_sha256
from ppvit.data.preprocess import Preprocess, normalize
from ppvit.models.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterMeta,
    adapter_files,
    adapter_preprocess,
    build_base,
    read_adapter_meta,
    read_adapter_tensors,
)
from ppvit.models.routing import RoutedAdapter, RoutedViT, routed_adapter
from ppvit.serve.defaults import KEEP_VERSIONS, MAX_CLASS_BYTES, MAX_CLASS_NAME, MAX_CLASSES, NAME, NAME_RULE
from ppvit.train.config import TrainConfig
from ppvit.train.runs import adapter_dir

SCHEMA_VERSION = 1
DB_NAME = "tenants.sqlite"
TOKEN_PREFIX = "ppvit_"
ISSUED_TOKEN = re.compile(TOKEN_PREFIX + r"[A-Za-z0-9_-]{43}")
MODEL_KWARGS = frozenset({"img_size"})  # the only create_backbone arguments an adapter config may set
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

    def __init__(self, root: str | os.PathLike, create: bool = True, hold_reader: bool = False) -> None:
        """``hold_reader``: open :meth:`by_token`'s connection now (the server: it then needs no write later)."""
        self.root = Path(root)
        self.db = self.root / DB_NAME
        if not self.db.exists():
            if not create:
                raise FileNotFoundError(f"server root {self.root}: no {DB_NAME} (add a tenant first)")
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.db, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite's -wal and -shm copy its mode
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")  # readers (the server) and a writer (the CLI) at once
            con.executescript(SCHEMA)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise ValueError(f"{self.db}: schema version {row[0]} is newer than this ppvit's ({SCHEMA_VERSION})")
        for path in (self.db, self.db.with_name(DB_NAME + "-wal"), self.db.with_name(DB_NAME + "-shm")):
            with contextlib.suppress(OSError):  # a store of an earlier release made private (if ours to change)
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
        self._reader: sqlite3.Connection | None = None  # by_token's, held open (see by_token)
        self._reader_lock = threading.Lock()
        if hold_reader:
            self.by_token("")

    @contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction, committed on success, rolled back on error; ``immediate``: holding the write lock
        from its start (a version number read and the row that takes it cannot interleave with another's)."""
        try:
            con = sqlite3.connect(self.db, timeout=30)
        except sqlite3.Error as exc:
            raise ValueError(f"{self.db}: cannot be opened ({exc})") from None
        try:
            con.execute("PRAGMA foreign_keys=ON")  # per connection; WAL is set once and kept by the file
            with con:
                if immediate:
                    con.execute("BEGIN IMMEDIATE")
                yield con
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.db}: {exc}") from None
        finally:
            con.close()

    def add(
        self,
        name: str,
        adapter: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        max_classes: int = MAX_CLASSES,
        token: str | None = None,
    ) -> str:
        """Register ``name`` with a copy of ``adapter``; returns the API token (shown once, never stored): ``token``,
        else a new one (a caller hands a token over before it is registered: a lost one locks nobody out)."""
        if not NAME.fullmatch(name):
            raise ValueError(f"tenant name {name!r}: {NAME_RULE}")
        token = checked_token(token)
        with self._connect() as con:
            _refuse_existing(con, name)  # before the copy and its checks, which take seconds
        staged, weights = self._stage(name, adapter, weights, max_classes)
        try:
            with self._connect(immediate=True) as con:
                _refuse_existing(con, name)
                cur = con.execute(
                    "INSERT INTO tenants (name, token_sha256, version, created) VALUES (?, ?, 1, ?)",
                    (name, hash_token(token), time.time()),
                )
                self._commit_version(con, cur.lastrowid, name, 1, staged, weights)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return token

    def set_adapter(
        self,
        name: str,
        adapter: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        keep: int = KEEP_VERSIONS,
        max_classes: int = MAX_CLASSES,
        activate: bool = True,
        record: Callable[[sqlite3.Connection, int], None] | None = None,
    ) -> int:
        """A new adapter version for ``name``, active unless ``activate`` is False (a training job's
        result, activated later by :meth:`activate`); the newest ``keep`` versions and the active
        one stay (the previous one for requests already in flight), older ones are deleted.

        The copy is made and checked first, without the lock; its version number is chosen, its folder
        moved in and its row written in one transaction holding the write lock: two registrations at once
        (the CLI's and a finished job's) take two versions, each with its own files. ``record(con, version)``
        runs in that transaction (a job marked succeeded with it: both or neither, whenever the process dies).
        """
        if keep < 1:
            raise ValueError(f"--keep {keep}: keep at least the active version (1)")
        with self._connect() as con:
            row = con.execute("SELECT name FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ValueError(f"no tenant {name}")
        staged, weights = self._stage(row[0], adapter, weights, max_classes)  # folders use the name as registered
        try:
            with self._connect(immediate=True) as con:
                row = con.execute("SELECT id, version, name FROM tenants WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise ValueError(f"no tenant {name}")  # removed while its adapter was checked
                tenant_id, active, stored_name = row
                version = con.execute("SELECT MAX(version) FROM adapters WHERE tenant_id = ?", (tenant_id,)).fetchone()[
                    0
                ]
                version = max(version or 0, active) + 1  # above inactive versions too
                self._commit_version(con, tenant_id, stored_name, version, staged, weights)
                if activate:
                    con.execute("UPDATE tenants SET version = ? WHERE id = ?", (version, tenant_id))
                    active = version
                stale = "FROM adapters WHERE tenant_id = ? AND version <= ? AND version != ?"
                old = con.execute("SELECT folder " + stale, (tenant_id, version - keep, active)).fetchall()
                con.execute("DELETE " + stale, (tenant_id, version - keep, active))
                if record is not None:
                    record(con, version)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone already where it became the version
        for (folder,) in old:  # after the commit: a failed registration deletes nothing
            shutil.rmtree(self.folder(folder), ignore_errors=True)
        return version

    def activate(self, name: str, version: int) -> None:
        """Serve ``name`` with its kept adapter ``version`` from the next request on."""
        with self._connect() as con:
            row = con.execute(
                "SELECT t.id FROM tenants t JOIN adapters a ON a.tenant_id = t.id WHERE t.name = ? AND a.version = ?",
                (name, version),
            ).fetchone()
            if row is None:
                raise ValueError(f"tenant {name}: no adapter version {version} (deleted, or never registered)")
            con.execute("UPDATE tenants SET version = ? WHERE id = ?", (version, row[0]))

    def rotate_token(self, name: str, token: str | None = None) -> str:
        """A new API token for ``name`` (``token``, else a new one); the old one stops working at once."""
        token = checked_token(token)
        with self._connect() as con:
            cur = con.execute("UPDATE tenants SET token_sha256 = ? WHERE name = ?", (hash_token(token), name))
            if cur.rowcount == 0:
                raise ValueError(f"no tenant {name}")
        return token

    def _stage(
        self, name: str, adapter: str | os.PathLike, weights: str | os.PathLike | None, max_classes: int
    ) -> tuple[Path, str | None]:
        """A private, checked copy of ``adapter`` in a temporary folder beside ``name``'s versions, and the
        base weights it was checked against (resolved): what :meth:`_commit_version` makes a version."""
        src = adapter_dir(adapter)
        read_adapter_meta(src)  # a clear error for what is not an adapter, before anything is copied
        store = self.root.resolve()
        if src.resolve().is_relative_to(store) and not src.resolve().is_relative_to(store / "jobs"):  # jobs: runs
            raise ValueError(f"adapter {src}: lies inside the server folder {self.root}; register a run's adapter")
        parent = self.root / "adapters" / name
        parent.parent.mkdir(mode=0o700, exist_ok=True)
        parent.mkdir(mode=0o700, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new.", dir=parent))  # 0700
        try:
            config, weights_file = adapter_files(src)  # a folder of 0.3 or earlier: PEFT's names, copied as ppvit's
            private = self._private_inodes()
            for file, name in ((weights_file, WEIGHTS_NAME), (config, CONFIG_NAME)):
                _copy_private(file, tmp / name, private)
            meta = read_adapter_meta(tmp)  # what was copied is what is checked and served
            if meta.method.get("method") == "full":
                raise ValueError(f"adapter {src}: full fine-tuning replaces the whole backbone; it cannot be routed")
            if meta.num_classes > max_classes:
                raise ValueError(f"adapter {src}: {meta.num_classes} classes; this server takes at most {max_classes}")
            try:
                check_classes(meta.classes or [], max_classes)
            except ValueError as exc:
                raise ValueError(f"adapter {src}: {exc}") from None
            if meta.weights_sha256 is not None:
                weights = weights or _run_weights(Path(adapter))
                if weights is None:
                    raise ValueError(f"adapter {src}: trained on a local weights file; pass it with --weights")
                if file_sha256(weights) != meta.weights_sha256:
                    raise ValueError(
                        f"weights file {weights}: not the base this adapter was trained on (sha256 differs)"
                    )
            check_routable(tmp, weights)  # refused now rather than answered with 503 for ever
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, str(Path(weights).resolve()) if weights else None

    def _commit_version(
        self, con: sqlite3.Connection, tenant_id: int, name: str, version: int, staged: Path, weights: str | None
    ) -> None:
        """Under the write lock: ``staged`` becomes the folder of ``version`` and its row (rolled back with
        the transaction, the folder stays without a row: the next registration of that number replaces it)."""
        rel = Path("adapters", name, f"v{version}")
        folder = self.root / rel
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.exists():  # no row names it (the version is above every row's): a failed registration's
            shutil.rmtree(folder)
        os.replace(staged, folder)
        con.execute(
            "INSERT INTO adapters VALUES (?, ?, ?, ?, ?)", (tenant_id, version, rel.as_posix(), weights, time.time())
        )

    def _private_inodes(self) -> set[tuple[int, int]]:
        """(device, inode) of every file of the tenants' private copies: a hard link to one, wherever it
        lies, is that tenant's file (a path check alone lets ``ln`` hand it to another tenant)."""
        found = set()
        for path in (self.root / "adapters").rglob("*"):
            with contextlib.suppress(OSError):  # removed meanwhile
                st = path.lstat()
                if stat.S_ISREG(st.st_mode):
                    found.add((st.st_dev, st.st_ino))
        return found

    def remove(self, name: str) -> None:
        """Remove ``name``, its token and every adapter version it has: the token revoked at once, then
        the files, the rows last, so that a removal cut short leaves the tenant to remove again (and no
        longer served), not files no row names."""
        with self._connect() as con:
            row = con.execute("SELECT id, name FROM tenants WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ValueError(f"no tenant {name}")
            con.execute("UPDATE tenants SET token_sha256 = ? WHERE id = ?", (hash_token(new_token()), row[0]))
            folders = [r[0] for r in con.execute("SELECT folder FROM adapters WHERE tenant_id = ?", (row[0],))]
        self._remove_folders(row[1], folders)
        with self._connect(immediate=True) as con:  # and any version registered meanwhile, with the rows
            folders = [r[0] for r in con.execute("SELECT folder FROM adapters WHERE tenant_id = ?", (row[0],))]
            con.execute("DELETE FROM tenants WHERE id = ?", (row[0],))
        self._remove_folders(row[1], folders)

    def _remove_folders(self, name: str, folders: list[str]) -> None:
        for folder in map(self.folder, folders):
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # a folder of another spelling of the name, now empty
                folder.parent.rmdir()
        shutil.rmtree(self.root / "adapters" / name, ignore_errors=True)

    def list(self) -> list[TenantAdapter]:
        with self._connect() as con:
            rows = con.execute(_ACTIVE + " ORDER BY t.name").fetchall()
        return [self._tenant(r) for r in rows]

    def by_token(self, token: str) -> TenantAdapter | None:
        """The tenant whose token this is, with its active adapter version; None for an unknown token.

        Reads through one connection held open: a new connection to a WAL database must write
        its shared-memory file, which fails on a full disk; a held one needs no write.
        """
        with self._reader_lock:
            if self._reader is None:
                try:
                    self._reader = sqlite3.connect(self.db, timeout=30, check_same_thread=False)
                except sqlite3.Error as exc:
                    raise ValueError(f"{self.db}: cannot be opened ({exc})") from None
            try:
                row = self._reader.execute(_ACTIVE + " WHERE t.token_sha256 = ?", (hash_token(token),)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"{self.db}: {exc}") from None
        return None if row is None else self._tenant(row)

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def folder(self, stored: str) -> Path:
        """An adapter folder as recorded: ``adapters/NAME/vK`` under this root, whatever directory
        registration ran in (earlier releases stored it relative to that directory, or absolute)."""
        parts = Path(stored).parts
        return self.root.joinpath(*parts[-3:]) if len(parts) >= 3 and parts[-3] == "adapters" else self.root / stored

    def _tenant(self, row: tuple) -> TenantAdapter:
        return TenantAdapter(row[0], row[1], row[2], self.folder(row[3]), Path(row[4]) if row[4] else None)


def _refuse_existing(con: sqlite3.Connection, name: str) -> None:
    if con.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():  # any case
        raise ValueError(f"tenant {name} exists already (remove-tenant first, or set-adapter)")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def checked_token(token: str | None) -> str:
    """``token`` if it is one :func:`new_token` could have made (256 random bits), else a new one when None: a
    library caller's "secret" or "" would otherwise be a tenant's whole protection."""
    if token is None:
        return new_token()
    if not (isinstance(token, str) and ISSUED_TOKEN.fullmatch(token)):
        raise ValueError(f"API token: not one ppvit issues ({TOKEN_PREFIX} and 43 URL-safe base64 characters)")
    return token


def _copy_private(src: Path, dst: Path, private: set[tuple[int, int]]) -> None:
    """Copy a regular file to a new 0600 file, refusing a symbolic link (never followed) and a file that is
    one of ``private`` (device, inode): a hard link to a tenant's private copy."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if os.path.islink(src):
            raise ValueError(f"adapter file {src}: a symbolic link; register real files") from None
        raise ValueError(f"adapter file {src}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"adapter file {src}: not a regular file")
        if (st.st_dev, st.st_ino) in private:  # the file opened, not the path checked: no race
            raise ValueError(f"adapter file {src}: a hard link to a file inside the server folder; register a run's")
        with open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def check_classes(names: object, most: int) -> None:
    """Class names as every answer carries them: a list of at most ``most`` texts, each of 1 to
    ``MAX_CLASS_NAME`` characters, ``MAX_CLASS_BYTES`` together (ValueError naming the first problem)."""
    if not isinstance(names, list) or len(names) > most:
        raise ValueError(f"classes: a list of at most {most} names")
    for name in names:
        if not (isinstance(name, str) and 0 < len(name) <= MAX_CLASS_NAME):
            shown = repr(name) if len(repr(name)) <= 40 else f"of {len(name)} characters"
            raise ValueError(f"class name {shown}: must be text of 1 to {MAX_CLASS_NAME} characters")
    if sum(len(n.encode("utf-8", "surrogatepass")) for n in names) > MAX_CLASS_BYTES:
        raise ValueError(f"classes: their names take over {MAX_CLASS_BYTES} bytes together")


def check_meta(meta: AdapterMeta, where: Path) -> None:
    """Refuse config fields that would make the server build something the registry never checked."""
    extra = sorted(set(meta.model_kwargs) - MODEL_KWARGS)
    if extra:
        raise ValueError(f"adapter config {where}: model_kwargs {', '.join(extra)} are not allowed in a served adapter")


def check_routable(adapter: Path, weights: str | os.PathLike | None) -> None:
    """Build the adapter's base and lay its tensors out for routing: every error a server would meet."""
    meta = read_adapter_meta(adapter)
    check_meta(meta, adapter)
    tensors = read_adapter_tensors(adapter, meta)
    base = build_base(meta, weights)
    recipe = adapter_preprocess(meta, base)  # a recipe the server would not follow is refused here
    probe_outputs(routed_adapter(meta, tensors, base), base, recipe, adapter)


def probe_outputs(adapter: RoutedAdapter, base: nn.Module, recipe: Preprocess, where: Path) -> None:
    """Refuse an adapter whose outputs are not finite on probe images (black, white, seeded noise): its every
    answer would be NaN probabilities, which the server would have to refuse one request at a time."""
    routed = RoutedViT(base)
    images = torch.stack(
        [
            torch.zeros(routed.in_channels, routed.side, routed.side, dtype=torch.uint8),
            torch.full((routed.in_channels, routed.side, routed.side), 255, dtype=torch.uint8),
            torch.randint(0, 256, (routed.in_channels, routed.side, routed.side), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)),
        ]
    )  # fmt: skip
    with torch.no_grad():
        rows = routed(normalize(images, recipe.mean, recipe.std), [adapter], torch.zeros(len(images), dtype=torch.long))
    if not all(bool(torch.isfinite(row).all()) for row in rows):
        raise ValueError(f"adapter {where}: its outputs are not finite on a probe image (weights that overflow)")


def _run_weights(run: Path) -> str | None:
    """The weights file named by a run folder's config.yaml (what ``ppvit train --weights`` was given)."""
    config = run / "config.yaml"
    return TrainConfig.load(config).backbone.weights if config.exists() else None


_ACTIVE = (
    "SELECT t.id, t.name, t.version, a.folder, a.weights FROM tenants t "
    "JOIN adapters a ON a.tenant_id = t.id AND a.version = t.version"
)
