"""The process a run trains in: Accelerate, mixed precision, peak memory.

Accelerate keeps its settings in process-wide singletons; :func:`make_accelerator` is the
one place that resets them, so that a second run in one process (a notebook, a test) may
use another precision. The process group (PartialState) is kept.
"""

from __future__ import annotations

import functools
import re
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration


def make_accelerator(
    precision: str = "no",
    grad_accum: int = 1,
    timeout_s: float | None = None,
    log_with: str | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """A fresh Accelerator; ``cpu=True`` without a GPU, since only then does Accelerate run several
    CPU processes (gloo).

    ``timeout_s``: how long a process of a multi-process run waits for the others (joining, and
    in every collective) before it raises instead of waiting for ever on a peer that hangs
    (torch's default: 30 minutes). It takes effect when the process group is created, i.e. on
    the first call in a process. ``log_with``: an Accelerate tracker (``tensorboard``, ``wandb``,
    ``mlflow``) writing under ``project_dir``.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))] if timeout_s else []
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=handlers,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir) if project_dir else None,
    )


# What gloo and NCCL say when a peer is gone or silent (they raise plain RuntimeErrors from C++).
_PEER_LOST = re.compile(r"gloo/|nccl|connection (reset|closed|refused)|broken pipe|timed out", re.IGNORECASE)


def peer_failure(exc: BaseException) -> str | None:
    """A short reason when ``exc`` says another process of a multi-process run died or stopped
    answering (a lost connection, a collective's or the rendezvous's timeout), else None."""
    if not dist.is_available():
        return None
    text = str(exc)
    several = dist.is_initialized() and dist.get_world_size() > 1
    if not (isinstance(exc, dist.DistError) or (several and isinstance(exc, RuntimeError) and _PEER_LOST.search(text))):
        return None
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return "no answer within the timeout"
    found = re.search(r"connection (reset|closed|refused)[a-z ]*|broken pipe", text, re.IGNORECASE)
    return found.group(0).strip().lower() if found else exc.__class__.__name__


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 on GPUs that have it (else fp16); on a CPU, bf16 only if it measures faster.

    Why measure: CPUs differ either way; bf16 was several times faster than fp32 on one
    machine here and slower on another without AMX (figures in BENCHMARKS.md).
    """
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_speedup() > 1.25 else "no"


@functools.cache
def cpu_bf16_speedup(n: int = 1024, reps: int = 5) -> float:
    """fp32 time over bf16 time of an n x n matrix multiply on this CPU (best of ``reps``).

    Randomness from a private generator: measuring must not move the caller's random stream.
    """
    gen = torch.Generator().manual_seed(0)

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    On Linux, VmHWM of /proc/self/status: the high-water mark of this process's own memory.
    Not ``ru_maxrss``: a child started by fork and exec inherits its parent's peak there.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux KiB, macOS bytes
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
