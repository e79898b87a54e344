"""router.metrics: the /metrics endpoint's ports, and what the batcher and observe_rpc record."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from router import metrics
from router.batcher import MicroBatcher


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_port_zero_serves_the_registry_on_a_free_port():
    registry = CollectorRegistry()
    Counter("probe", "A counter only this test's registry has.", registry=registry).inc(3)
    server = metrics.start_metrics_server("127.0.0.1", 0, registry)
    assert server is not None and server.port > 0
    try:
        assert "probe_total 3.0" in scrape(server.port)
    finally:
        server.close()


def test_minus_one_disables_the_endpoint():
    assert metrics.start_metrics_server("127.0.0.1", -1) is None


def test_a_taken_port_fails_loudly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            metrics.start_metrics_server("127.0.0.1", taken.getsockname()[1], CollectorRegistry())


def test_observe_rpc_times_and_counts_by_method_and_code():
    before = (
        sample("router_route_seconds_count", method="Probe"),
        sample("router_requests_total", method="Probe", code="INVALID_ARGUMENT"),
    )
    metrics.observe_rpc("Probe", "INVALID_ARGUMENT", 0.002)
    assert sample("router_route_seconds_count", method="Probe") == before[0] + 1
    assert sample("router_requests_total", method="Probe", code="INVALID_ARGUMENT") == before[1] + 1


async def test_batcher_records_each_batch_size_and_empties_the_queue_gauge():
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def run_batch(queries: list[str]) -> list[str]:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)  # hold the first batch
        return queries

    count, total = sample("router_batch_size_count"), sample("router_batch_size_sum")
    b: MicroBatcher[str, str] = MicroBatcher(run_batch, max_batch_size=8, max_queue=100)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await asyncio.sleep(0.05)  # the engine is now busy with ["a"]; the next five queue up
    rest = asyncio.gather(*(b.submit(str(i)) for i in range(5)))
    await asyncio.sleep(0.05)
    assert sample("router_queue_depth") == 5
    release.set()
    assert await first == "a" and await rest == [str(i) for i in range(5)]
    await b.stop()
    assert sample("router_batch_size_count") == count + 2
    assert sample("router_batch_size_sum") == total + 6
    assert sample("router_queue_depth") == 0
