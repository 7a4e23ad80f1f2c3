"""The server's Prometheus metrics (``GET /metrics`` when asked for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from ppvit.models.routing import RoutedViT


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ppvit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "ppvit_request_seconds",
            "predict latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.batch_size = Histogram("ppvit_batch_images", "images per routed forward", buckets=sizes, registry=r)
        self.batch_tenants = Histogram("ppvit_batch_adapters", "adapters per routed forward", buckets=sizes, registry=r)
        self.pass_seconds = Histogram(
            "ppvit_pass_seconds",
            "seconds of a routed forward pass, the host-device copies included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.resident = Gauge("ppvit_adapters_resident", "adapters in memory", registry=r)
        self.resident_bytes = Gauge("ppvit_adapter_bytes_resident", "bytes of adapter tensors in memory", registry=r)
        self.copy_bytes = Gauge(
            "ppvit_routing_copy_bytes",
            "bytes of adapters' copies the bases keep for speed (slot tables, one tenant's merged weights)",
            registry=r,
        )
        self.graph_captures = Gauge(
            "ppvit_routing_graph_captures",
            "routed passes recorded as CUDA graphs so far (one a batch-size bucket, again when the slot tables move)",
            registry=r,
        )
        self.graphs_off = Gauge(
            "ppvit_routing_graphs_failed",
            "bases whose recording of a CUDA graph failed: they serve eagerly (the server log says why)",
            registry=r,
        )

    def watch_routing(self, routed: Callable[[], list[RoutedViT]]) -> None:
        """The routing gauges, read from the bases' routed models when scraped (``routed``: them, now)."""
        self.copy_bytes.set_function(lambda: sum(r.copy_nbytes for r in routed()))
        self.graph_captures.set_function(lambda: sum(r.graphs.captures for r in routed() if r.graphs))
        self.graphs_off.set_function(lambda: sum(r.graphs.failed is not None for r in routed() if r.graphs))
