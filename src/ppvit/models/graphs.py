"""Routed passes replayed as captured CUDA graphs: the host launches one graph where it dispatched ~3,000 operators.

A serving pass of a few dozen images through ViT-Ti on a GPU is bound by the host: on an H200 one merged model's
pass of 64 images took 7 ms for about 1 ms of arithmetic, and a routed pass mixing 16-64 tenants (2,300-3,300
operators against the merged model's 1,267) ran at 0.48-0.64 of it. A CUDA graph records the kernels of one pass
once and replays them with a single launch, so the host's share no longer grows with the operators a pass needs.

A graph replays the kernels it recorded on the memory it recorded them on: its inputs are static buffers the pass
copies into, and everything else it reads (the backbone's weights, the slot tables) must stay where it was. So a
graph is captured per batch-size bucket (powers of two; a batch is padded up to its bucket, the padding's rows
discarded) and per :attr:`~ppvit.models.slots.SlotTables.signature` (each table's address, shape and dtype): a
table that grew or was started afresh is a new signature, and that bucket's graph is captured again (at the second
pass in a row that finds it so: tables that change every pass run eagerly rather than record each time). Slots
written in place (a newcomer in a free or evicted row) keep the signature: the graph reads their new values. Every
pass of the graph gathers from the tables, one tenant's too: one graph serves any mix of the resident adapters.

``capture`` is how a pass is recorded: :func:`cuda_graph` on a GPU; a test passes a recorder with the same
contract (the tensors it read fixed at capture, the output written to one buffer each replay) to check the
routing's use of it on a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ppvit.models.slots import SampleIndex

log = logging.getLogger(__name__)

Replay = Callable[[], torch.Tensor]
"""Runs the recorded pass again; returns its output buffer (overwritten by the next replay)."""
Capture = Callable[[Callable[[], torch.Tensor]], Replay]
"""Records ``fn`` (a pass reading only tensors that stay where they are) and returns its replay."""

MAX_BUCKET = 256
"""The largest batch a graph is captured for (bigger batches run eagerly: their host share is small)."""


def cuda_graph(device: torch.device) -> Capture:
    """Capture on ``device`` (a CUDA device): two warm-up runs on a side stream (cuBLAS workspaces, cuDNN's
    choices), then the recording; graphs of one ``RoutedViT`` share one memory pool (they never run at once,
    and each pass's output is read, on the same stream, before the next replay).

    Everything happens with ``device`` current and on streams of it: captured on another device's stream (the
    caller's thread keeps device 0 current), a graph of ``cuda:1`` recorded nothing and replayed nothing."""
    with torch.cuda.device(device):
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)  # one for every capture: the pool's blocks are reused within a stream only

    def capture(fn: Callable[[], torch.Tensor]) -> Replay:
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: the server's other threads (an adapter loading onto the device) may go on meanwhile
                with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                    out = fn()
            except Exception as exc:
                # torch.cuda.graph's exit ends the capture before it restores the stream, and raises: put the
                # caller's stream back, and name the pass's own error (not "a previous error during capture")
                torch.cuda.set_stream(caller)
                first: BaseException = exc
                while first.__context__ is not None:
                    first = first.__context__
                raise RuntimeError(f"capture failed: {type(first).__name__}: {first}") from exc

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


def bucket(batch: int) -> int:
    """The batch size a pass of ``batch`` images is captured at: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


class PassGraphs:
    """One routed model's captured passes, by bucket; replaced when what they read moved."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.captures = 0  # graphs recorded so far (a figure for /metrics and benchmarks: each costs a few passes)
        self.failed: str | None = None  # why capture is off (then every pass runs eagerly)
        self._graphs: dict[int, tuple[tuple, torch.Tensor, torch.Tensor, Replay]] = {}
        self._seen: dict[int, tuple] = {}  # per bucket: the key of its last pass run eagerly

    def usable(self, x: torch.Tensor) -> bool:
        """Whether a pass of ``x`` is replayed (capture works and the batch fits a bucket)."""
        return self.failed is None and 0 < len(x) <= MAX_BUCKET

    def run(
        self,
        x: torch.Tensor,
        rows: Sequence[int],
        signature: tuple,
        recorded: Callable[[torch.Tensor, SampleIndex], torch.Tensor],
    ) -> torch.Tensor | None:
        """The pass's output for ``x`` with sample i reading row ``rows[i]`` of the tables, replayed (captured
        first where its bucket's last pass had this ``signature`` too, but no graph of it); None where the pass is
        to run eagerly (its bucket or tables new, or capture failed).
        ``recorded(x, at)`` is the pass itself: reading ``x`` and gathering the tables at ``at``."""
        size = bucket(len(x))
        key = (
            signature,
            tuple(x.shape[1:]),
            x.dtype,
            x.device,
            torch.is_autocast_enabled(x.device.type),
            torch.get_autocast_dtype(x.device.type),
        )
        held = self._graphs.get(size)
        if held is None or held[0] != key:
            # the graphs of tables that moved go (with their memory) before this one is recorded
            self._graphs = {b: graph for b, graph in self._graphs.items() if graph[0] == key}
            if self._seen.get(size) != key:  # new here: recorded at its second pass in a row (a bucket whose
                self._seen[size] = key  # tables change every pass, as a wide tenant and narrow ones alternating
                return None  # at the byte bound, runs eagerly rather than paying a recording each pass)
            with torch.inference_mode(False):  # buffers a pass in or out of inference mode may write
                static_x = x.new_zeros(size, *x.shape[1:])
                static_rows = torch.zeros(size, dtype=torch.long, device=x.device)
            at = SampleIndex.static(static_rows)
            try:
                replay = self.capture(lambda: recorded(static_x, at))
            except Exception as exc:  # an operator the device cannot record: serve eagerly, say so once
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("routed passes run eagerly: capturing one failed (%s)", self.failed)
                self._graphs.clear()
                return None
            self.captures += 1
            held = self._graphs[size] = (key, static_x, static_rows, replay)
        _, static_x, static_rows, replay = held
        static_x[: len(x)].copy_(x)
        padded = torch.tensor([*rows, *[0] * (size - len(rows))])  # padding reads row 0, which exists; dropped
        static_rows.copy_(padded, non_blocking=True)
        return replay()[: len(x)]
