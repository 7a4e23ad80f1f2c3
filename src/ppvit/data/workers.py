"""The worker pool of ``ppvit encrypt`` and ``decrypt``: decode, resize and transform images in processes.

The key reaches each worker through the pool's initializer, never argv or logs. Workers die
with the process that started them, even when it is SIGKILLed, and leave Ctrl-C to it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.images import resize_array
from ppvit.data.manifest import MARKER, marker_agrees
from ppvit.data.sources.base import Item, decode

Result = tuple[str, np.ndarray | None, str | None]  # (relative path, transformed pixels, or why not)
WorkerInit = tuple[bytes, str, int, int | None, bool, str | None]
"""(key secret, scheme, block size, size, decrypting, the marker text its ciphertext states: decrypting only)"""

_worker: dict[str, object] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def transform_all(
    items: Iterable[Item], init: WorkerInit, workers: int, consume: Callable[[Iterator[Result]], None]
) -> None:
    """Transform ``items`` in ``workers`` processes (1: in this one), handing results to ``consume`` in order.

    Work is queued in bounded windows (``Executor.map`` would read the whole source before the
    first result); on any error in here or in ``consume`` (a full disk, Ctrl-C, SIGTERM) the
    queued work is dropped, not finished.
    """
    if workers <= 1:
        _init_worker(*init)
        consume(map(_transform_one, items))
        return
    pending = iter(items)
    with ProcessPoolExecutor(workers, initializer=_init_pool_worker, initargs=init) as pool:
        try:
            while window := list(itertools.islice(pending, 64 * workers)):
                consume(pool.map(_transform_one, window, chunksize=16))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _init_worker(
    secret: bytes, scheme: str, block_size: int, size: int | None, decrypting: bool, marker: str | None
) -> None:
    """Sets up the transform in a worker process (or this one)."""
    cipher = BlockCipher(Key(secret), scheme, block_size)
    _worker.update(cipher=cipher, size=size, decrypting=decrypting, marker=marker)


def _init_pool_worker(*args: object) -> None:
    """The pool's initializer: tie the worker's life to its parent's, one torch thread, then :func:`_init_worker`.

    One thread as in torch's DataLoader workers: a forked child that enters the OpenMP pool its
    parent had used (a process that trained, then encrypts) can deadlock; the cores are the pool's.
    """
    import torch

    torch.set_num_threads(1)
    _die_with_parent()
    _init_worker(*args)  # type: ignore[arg-type]


def _die_with_parent() -> None:
    """Make this worker exit when the process that started it dies, even by SIGKILL.

    Otherwise a killed ``ppvit encrypt`` leaves its workers asleep on the task queue forever.
    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Everywhere:
    a daemon thread exits when the parent changes (the orphan is re-parented). Ctrl-C goes to
    the whole process group: workers ignore it and the parent stops the pool, so only the
    parent reports it.
    """
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the parent's handler
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="ppvit-parent-watch", daemon=True).start()


def _transform_one(item: Item) -> Result:
    """Decode, resize, encrypt (or decrypt) one image: the work a worker does. Arrays (npz shards) are taken
    as they are: a mixing's ciphertext is float16 or integers, no image."""
    rel, data = item
    stated = None
    if isinstance(data, np.ndarray):
        arr = data
    else:
        got = decode(rel, data)
        if got.error is not None:
            return rel, None, got.error
        arr, stated = np.asarray(got.image), got.image.info.get(MARKER)
    size = _worker["size"]
    if not _worker["decrypting"]:
        arr = arr if size is None else resize_array(arr, size)  # type: ignore[arg-type]
    elif size is not None and arr.shape[:2] != (size, size):  # ciphertext is never resized: noise if it were
        return rel, None, f"is {arr.shape[1]}x{arr.shape[0]}; the dataset's ciphertext is {size}x{size}"
    elif _worker["marker"] is not None and not marker_agrees(stated, _worker["marker"]):  # type: ignore[arg-type]
        return rel, None, f"its {MARKER} chunk says {stated}; the manifest, {_worker['marker']}"
    cipher: BlockCipher = _worker["cipher"]  # type: ignore[assignment]
    try:
        out = cipher.decrypt(arr) if _worker["decrypting"] else cipher.encrypt(arr)
    except ValueError as exc:  # e.g. a side that is not a multiple of the block size
        return rel, None, str(exc)
    return rel, out, None
