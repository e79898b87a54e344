"""Prometheus metrics: the objects the batcher and servicer record, and their HTTP endpoint."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

log = logging.getLogger(__name__)

# Powers of two up to the largest allowed max_batch_size (router.config).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Route takes milliseconds when idle and up to the queue's wait under load.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

BATCH_SIZE = Histogram(
    "router_batch_size", "Queries in each batch the engine ran.", buckets=BATCH_SIZE_BUCKETS
)
QUEUE_DEPTH = Gauge("router_queue_depth", "Queries waiting for the engine.")
ROUTE_SECONDS = Histogram(
    "router_route_seconds", "Time from request decoded to response ready, per RPC method.",
    ["method"], buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "router_requests", "Router RPCs answered, by method and status code.", ["method", "code"]
)

CASCADE = Counter(
    "router_cascade_decisions",
    "Decisions of profiles with a cascade, by the stage that made them (first: the cheap encoder "
    "was sure enough; main: close to the threshold, the main encoder decided).", ["stage"],
)


def observe_rpc(method: str, code: str, seconds: float) -> None:
    """Record one answered RPC: `method` is the short name (Route), `code` a status name (OK)."""
    ROUTE_SECONDS.labels(method=method).observe(seconds)
    REQUESTS.labels(method=method, code=code).inc()


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint (a daemon thread); `port` is the one actually bound."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry = REGISTRY
) -> MetricsServer | None:
    """Serve `registry` on http://host:port/metrics; port 0 picks a free one, -1 serves nothing.
    A port that is taken raises OSError, as the gRPC port does."""
    if port < 0:
        log.info("metrics endpoint disabled (metrics_port=%d)", port)
        return None
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    server = MetricsServer(httpd, thread)
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server


# -- drift and shadow ----------------------------------------------------------------------

TIER_SHARE = Gauge(
    "router_tier_share", "Share of each tier among the profile's last decisions (rolling window).",
    ["profile", "tier"],
)
TIER_SHARE_TARGET = Gauge(
    "router_tier_share_target", "The profile's target share per tier (profiles in mode share).",
    ["profile", "tier"],
)
SHADOW_DECISIONS = Counter("router_shadow_decisions", "Requests the shadow model scored.", ["profile"])
SHADOW_DISAGREEMENTS = Counter(
    "router_shadow_disagreements", "Requests where the shadow model would have chosen another tier.", ["profile"]
)
SHADOW_SKIPPED = Counter("router_shadow_skipped", "Batches the shadow model skipped because it was busy.")
SHADOW_TIER_SHARE_SHIFT = Gauge(
    "router_shadow_tier_share_shift",
    "Shadow model's share of a tier minus the live model's, over the rolling window.", ["profile", "tier"],
)
DECISIONS_DROPPED = Gauge("router_decision_log_dropped", "Decisions the log could not keep (buffer full).")
DECISIONS_PENDING = Gauge("router_decision_log_pending", "Decisions waiting to be written to the log.")
