"""Atomic file output: a reader or a crash never sees a half-written file; JSON that strict parsers read; files read
whole only where they are regular files of a bounded size."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# the temporary names of atomic_write (and Key.save): ".NAME.XXXXXXXX.tmp", 8 random characters
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def current_umask() -> int:
    """This process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a mode depends on it)
    os.umask(old)
    return old


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary name lives in the destination folder so the rename is atomic on POSIX;
    on any error it is removed and ``path`` is left as it was. The file gets ``mode`` if
    given (0600 for anything secret), else what the user's umask gives a new file (0644
    under umask 022), not the temporary file's private 0600. An ``OSError`` (a full disk, a
    read-only folder) is raised again naming ``path``, not the temporary name.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_temp(tmp, path, mode)


def commit_temp(tmp: Path, path: Path, mode: int | None = None) -> None:
    """Give a finished temporary file its mode, flush it to disk and rename it to ``path``.

    The second half of :func:`atomic_write`, for writers that fill the temporary file
    themselves (a tar stream). On any error the temporary file is removed; an ``OSError``
    names ``path``.
    """
    try:
        _replaceable(path)
        os.chmod(tmp, (0o666 & ~current_umask()) if mode is None else mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _replaceable(path: Path) -> None:
    """A file, a link or nothing may be replaced by the rename; a device, FIFO or socket never (as root, ``merge
    --force ... /dev/full`` replaced the device node with a regular file)."""
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(kind) or stat.S_ISLNK(kind) or stat.S_ISDIR(kind)):  # a folder: the rename's own error
        raise OSError(errno.EEXIST, "exists and is not a regular file; refusing to replace it", str(path))


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error (type, errno, message) about the file the caller asked for."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted (killed) writer left in ``folder``'s tree; returns them.

    Only names of :func:`atomic_write`'s form (``.NAME.XXXXXXXX.tmp``) are touched. Call it
    where no other writer is at work (a run that owns its output folder).
    """
    removed = []
    for p in Path(folder).rglob(".*.tmp"):
        if TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with its non-finite floats replaced, the one convention of every JSON file ppvit writes.

    Strict JSON has no infinity or NaN (Python's ``json`` writes ``Infinity``, which other parsers reject):
    ``inf`` and ``-inf`` become the strings ``"inf"`` and ``"-inf"`` (an exact decryption's PSNR), NaN
    becomes null (no value, e.g. an SSIM of images narrower than its window). Dicts, lists and tuples
    are walked; anything else is returned as it is.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_text(doc: Any, indent: int | None = 2) -> str:
    """``doc`` as strict JSON (:func:`json_safe`, then ``allow_nan=False``) ending in a newline.

    A document with no infinity or NaN (a server's every answer but a rare one) is written as it is:
    walking it first cost more than writing it."""
    try:
        return json.dumps(doc, indent=indent, allow_nan=False) + "\n"
    except ValueError:  # a float that is not finite somewhere in it
        return json.dumps(json_safe(doc), indent=indent, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, doc: Any) -> None:
    """Write ``doc`` to ``path`` as strict JSON (:func:`json_text`), atomically."""
    atomic_write_text(path, json_text(doc))


def first_missing(path: str | os.PathLike) -> Path | None:
    """The first folder of ``path`` (itself or an ancestor) that does not exist yet: what creating it makes."""
    path = Path(path).absolute()
    return next((p for p in reversed([path, *path.parents]) if not p.exists()), None)


def remove_empty_folders(path: str | os.PathLike, created: Path | None) -> None:
    """Remove ``path`` and its parents while they are empty, up to ``created`` (from :func:`first_missing`,
    before the folders were made): a failed command leaves no empty folder it made, and none of a user's."""
    if created is None:
        return
    for folder in [Path(path).absolute(), *Path(path).absolute().parents]:
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == created:
            return


class LockHeld(Exception):
    """Another process holds the lock; ``holder``: the pid it wrote, or ''."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: str | os.PathLike) -> IO[str]:
    """An exclusive ``flock`` on ``path`` (made if missing, 0600), held until the returned file is closed or the
    process ends (a killed one's is released by the system), with this pid written in; :class:`LockHeld` if
    another process holds it. Not POSIX: no lock."""
    fh = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+")  # noqa: SIM115 -- held open by the caller
    try:
        import fcntl
    except ImportError:
        return fh
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held (another error, e.g. no locks on a network file system, is said as it is)
        holder = fh.read().strip()
        fh.close()
        raise LockHeld(holder) from None
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def file_chunks(path: str | os.PathLike, size: int = 1 << 20) -> Iterator[bytes]:
    """A file's bytes in pieces of ``size``: hashed or sent without holding the file in memory."""
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for chunk in file_chunks(path):
        h.update(chunk)
    return h.hexdigest()


MAX_JSON_BYTES = 16 << 20  # a manifest, an adapter config, a run result: kilobytes (21,000 class names: 0.5 MB)


def check_regular_file(path: str | os.PathLike, limit: int, what: str = "a file") -> None:
    """OSError unless ``path`` is a regular file of at most ``limit`` bytes, checked before it is opened: a FIFO was
    waited on forever, ``/dev/zero`` (a name in a folder, a link, a ``--key``) read until memory ran out; ``what``
    names the kind in the message ("an image")."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a folder, a device, a pipe or a socket)", str(path))
    if info.st_size > limit:
        raise too_large(info.st_size, limit, what, str(path))


def too_large(size: int, limit: int, what: str, name: str | None = None) -> OSError:
    """The error of a file (an archive's member) of ``size`` bytes, over the ``limit`` that ``what`` may be."""
    return OSError(errno.EFBIG, f"{size:,} bytes, over the {limit:,} {what} may be", name)


def read_regular_file(path: str | os.PathLike, limit: int, what: str = "a file") -> bytes:
    """A file's bytes, or OSError (:func:`check_regular_file`; a file grown past ``limit`` since is not read on)."""
    check_regular_file(path, limit, what)
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"over the {limit:,} bytes {what} may be", str(path))
    return data


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, what: str = "a JSON file") -> Any:
    """One of ppvit's JSON files (a key, a manifest, an adapter config, a run result), parsed.

    OSError where it cannot be read (:func:`read_regular_file`); ValueError saying what is wrong with its text: not
    UTF-8 or not JSON, nested too deep for the parser (a RecursionError), an integer past Python's digit limit.
    Callers name the file and what it is for."""
    data = read_regular_file(path, limit, what)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("not JSON ppvit reads (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and the digit limit of int("1" * 5000)
        raise ValueError(f"not JSON ppvit reads ({exc})") from None
