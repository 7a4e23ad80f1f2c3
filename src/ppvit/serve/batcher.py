"""The image-fair batcher: requests of all tenants through their base in one routed forward per pass.

Scheduling is by images, not requests (deficit round robin over compute): each tenant has its
own queue, a pass divides its per-image compute max-min fairly among the waiting tenants, and a
large request is split across passes and answered whole, so one tenant's large requests do not
delay another's one image. One forward runs at a time, in a single worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ppvit.serve.auth import HTTPError
from ppvit.serve.cache import Served
from ppvit.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request's images; a large one is computed in pieces across forward passes."""

    served: Served
    images: torch.Tensor  # (n, H, W, C) as the request carried them (uint8, or a mixing's float16/int), on the host
    future: asyncio.Future
    taken: int = 0  # images handed to a forward pass so far
    rows: list[torch.Tensor] = field(default_factory=list)  # their logits (one row per image, its own classes)

    def deliver(self, rows: list[torch.Tensor]) -> None:
        """The logits of this job's next piece; the request is answered when all its images have them."""
        self.rows.extend(rows)
        if len(self.rows) == len(self.images) and not self.future.done():
            self.future.set_result(self.rows)


@dataclass(frozen=True)
class Piece:
    job: Job
    start: int
    stop: int


ACTIVE_S = 1.0  # a tenant counts as sharing the server for this long after its last request arrived


class PassTimes:
    """A base's forward time as ``fixed + per_image * n``, fitted on its recent passes.

    Only the per-image part is charged to a tenant's share of a pass: charging the fixed part
    (dispatch, gathering adapters) per image would make small passes look dear and shrink them
    further. Until passes of different sizes have been seen, the average time per image stands in
    (an overestimate: shares come out smaller, never larger).
    """

    def __init__(self, keep: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=keep)
        self.slope: float | None = None

    def add(self, images: int, seconds: float) -> None:
        self.samples.append((images, seconds))
        ns = np.array([n for n, _ in self.samples], dtype=float)
        ts = np.array([t for _, t in self.samples])
        if ns.var() >= 1.0:  # sizes vary enough to read a slope; else the last one stands
            slope = float(((ns - ns.mean()) * (ts - ts.mean())).mean() / ns.var())
            average = float(ts.sum() / ns.sum())
            self.slope = min(max(slope, 0.2 * average), average)  # timing noise kept within sense

    @property
    def per_image(self) -> float:
        if self.slope is not None:
            return self.slope
        return sum(t for _, t in self.samples) / sum(n for n, _ in self.samples) if self.samples else float("inf")


def fair_shares(demand: dict[int, float], budget: float) -> dict[int, float]:
    """Max-min fair division of ``budget`` (water filling): a tenant needing less than an equal
    share gets what it needs, and what it leaves is divided among the others."""
    shares, left = {}, budget
    for i, tenant in enumerate(sorted(demand, key=demand.__getitem__)):
        shares[tenant] = min(demand[tenant], left / (len(demand) - i))
        left -= shares[tenant]
    return shares


class Batcher:
    """Collects requests for ``window`` seconds (or ``max_batch`` images) and runs one routed forward per base.

    Scheduling is by images, not requests, so that a tenant sending large requests cannot make a
    neighbour's small one wait behind them (deficit round robin over compute). Each tenant has its
    own queue. While only one tenant is active a pass takes up to ``max_batch`` images; while
    several are (a request within the last second), ``shared_pass`` seconds of per-image compute
    (each base's measured time per image) are divided max-min fairly among the waiting tenants,
    each getting at least one image a pass, large requests being split across passes and answered
    whole. A request arriving during a pass thus waits for about one ``shared_pass``, and its own.
    """

    def __init__(self, window: float, max_batch: int, metrics: Metrics, shared_pass: float = 0.02) -> None:
        self.window, self.max_batch, self.metrics, self.shared_pass = window, max_batch, metrics, shared_pass
        self.queues: OrderedDict[int, deque[Job]] = OrderedDict()  # by tenant id
        self.seen: dict[int, float] = {}  # tenant id -> when its last request arrived
        self.times: dict[int, PassTimes] = {}  # by id(base)
        self.queued = 0  # images waiting
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ppvit-forward")
        self.closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Refuse new jobs, answer every job already queued, then stop the loop."""
        self.closing = True
        self.arrived.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=60)
            self._task.cancel()
        for queue in self.queues.values():  # only if the loop died: never left unanswered
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(HTTPError(503, "the server is shutting down"))
        self.executor.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, served: Served, images: torch.Tensor) -> list[torch.Tensor]:
        """The logits of ``images`` ((N, H, W, C) as the request carried them; one row each, in the host's
        memory), computed with ``served``'s adapter after its recipe's normalisation."""
        if self.closing or not self.alive:
            raise HTTPError(503, "the server is shutting down")
        if not len(images):  # nothing to schedule (a job must give at least one image to a pass)
            return []
        loop = asyncio.get_running_loop()
        tenant = served.tenant.tenant_id
        future = loop.create_future()
        self.queues.setdefault(tenant, deque()).append(Job(served, images, future))
        self.seen[tenant] = loop.time()
        self.queued += len(images)
        self.arrived.set()
        return await future

    def sharing(self) -> bool:
        """Whether more than one tenant is active (forgetting tenants idle for ``ACTIVE_S``)."""
        now = asyncio.get_running_loop().time()
        self.seen = {t: when for t, when in self.seen.items() if now - when < ACTIVE_S or t in self.queues}
        return len(self.seen) > 1

    def take(self) -> list[Piece]:
        """The next pass: each waiting tenant's share, in turn, up to ``max_batch`` images in all.

        Requests whose client left are dropped. A pass always takes at least one image.
        """
        for tenant in list(self.queues):
            queue = self.queues[tenant]
            while queue and queue[0].future.done():  # cancelled: nobody to answer
                job = queue.popleft()
                self.queued -= len(job.images) - job.taken
            if not queue:
                del self.queues[tenant]
        budget = self.shared_pass if self.sharing() else float("inf")
        cost = {  # seconds per image of each tenant's base; unmeasured: the whole budget (one image a pass)
            t: self.times[id(q[0].served.base)].per_image if id(q[0].served.base) in self.times else budget
            for t, q in self.queues.items()
        }
        demand = {t: cost[t] * sum(len(j.images) - j.taken for j in q) for t, q in self.queues.items()}
        shares = fair_shares(demand, budget)
        taken: dict[Job, int] = {}  # job -> images taken this pass (insertion order = pass order)
        served: list[int] = []
        count = 0
        for tenant in list(self.queues):
            queue, spent, before = self.queues[tenant], 0.0, count
            while queue and count < self.max_batch:
                job = queue[0]
                if job.future.done():  # its client left while earlier pieces ran
                    self.queued -= len(queue.popleft().images) - job.taken
                    continue
                if spent > 0 and spent + cost[tenant] > shares[tenant] * (1 + 1e-9):
                    break
                spent, count = spent + cost[tenant], count + 1
                taken[job] = taken.get(job, 0) + 1
                job.taken += 1
                self.queued -= 1
                if job.taken == len(job.images):
                    queue.popleft()
            if count > before:
                served.append(tenant)
            if not queue:
                del self.queues[tenant]
        for tenant in served:  # served tenants go to the back, in the order they were served
            if tenant in self.queues:
                self.queues.move_to_end(tenant)
        return [Piece(job, job.taken - n, job.taken) for job, n in taken.items()]

    async def _wait(self, timeout: float | None) -> bool:
        """Until a job arrives (True) or ``timeout`` passes (False)."""
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queues:
                if self.closing:
                    return
                await self._wait(None)
            deadline = loop.time() + self.window
            while self.queued < self.max_batch and not self.closing and deadline > loop.time():
                if not await self._wait(deadline - loop.time()):
                    break
            by_base: dict[int, list[Piece]] = {}
            for piece in self.take():
                by_base.setdefault(id(piece.job.served.base), []).append(piece)
            for pieces in by_base.values():
                try:
                    await self._forward(pieces)
                except Exception:  # a failed forward fails its own requests, never the loop
                    log.exception("routed forward failed")
                    for piece in pieces:
                        if not piece.job.future.done():
                            piece.job.future.set_exception(HTTPError(500, "inference failed (see the server log)"))

    async def _forward(self, pieces: list[Piece]) -> None:
        adapters: dict[tuple[int, int], int] = {}
        for p in pieces:
            adapters.setdefault(p.job.served.tenant.cache_key, len(adapters))
        unique = {p.job.served.tenant.cache_key: p.job.served.adapter for p in pieces}
        counts = torch.tensor([p.stop - p.start for p in pieces])
        index = torch.tensor([adapters[p.job.served.tenant.cache_key] for p in pieces]).repeat_interleave(counts)
        recipes = [(p.job.served.preprocess.mean, p.job.served.preprocess.std) for p in pieces]
        if len(set(recipes)) == 1:  # one recipe for the pass: per channel
            mean, std = (torch.tensor(v) for v in recipes[0])
        else:  # per image
            mean, std = (torch.tensor([r[i] for r in recipes]).repeat_interleave(counts, 0) for i in (0, 1))
        images = [p.job.images[p.start : p.stop] for p in pieces]
        base = pieces[0].job.served.base
        self.metrics.batch_size.observe(len(index))
        self.metrics.batch_tenants.observe(len(adapters))
        t0 = time.perf_counter()
        logits = await asyncio.get_running_loop().run_in_executor(
            self.executor, base.forward, images, mean, std, list(unique.values()), index
        )
        seconds = time.perf_counter() - t0
        self.metrics.pass_seconds.observe(seconds)
        self.times.setdefault(id(base), PassTimes()).add(len(index), seconds)
        start = 0
        for p in pieces:
            n = p.stop - p.start
            if not p.job.future.done():  # a client that went away left a cancelled future
                p.job.deliver(logits[start : start + n])
            start += n
