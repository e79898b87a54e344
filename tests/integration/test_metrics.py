"""Metrics of the real server: RPCs counted by code in-process, and serve()'s /metrics endpoint."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from bench.serverproc import ServerProcess
from router.config import Settings
from router.server import build_server
from router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import MODELS, PROFILES


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_route_calls_are_timed_and_counted_by_code():
    settings = Settings(host="127.0.0.1", port=0, model_dir=MODELS, profiles_path=PROFILES,
                        device="cpu", intra_op_threads=1, grace_seconds=1.0)
    async with build_server(settings) as server:
        ok = sample("router_requests_total", method="Route", code="OK")
        bad = sample("router_requests_total", method="Route", code="INVALID_ARGUMENT")
        timed = sample("router_route_seconds_count", method="Route")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            await stub.Route(router_pb2.RouteRequest(prompt="Write a haiku about autumn."))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Route(router_pb2.RouteRequest())
    assert sample("router_requests_total", method="Route", code="OK") == ok + 1
    assert sample("router_requests_total", method="Route", code="INVALID_ARGUMENT") == bad + 1
    assert sample("router_route_seconds_count", method="Route") == timed + 2


def test_serve_process_exposes_metrics_on_the_logged_port(model_dir):
    server = ServerProcess(model_dir, threads=1)
    try:
        with grpc.insecure_channel(server.target) as channel:
            router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(prompt="hi there"))
        assert server.metric("router_batch_size_count") >= 1
        assert server.metric("router_requests_total") == 1
        assert server.rss_mib() > 10
    finally:
        assert server.stop() == 0
