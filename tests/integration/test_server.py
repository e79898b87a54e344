"""The real server on 127.0.0.1:0 with the real shipped model: Route, RouteBatch, health, reflection, errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from router.config import Settings
from router.server import RouterServer, build_server
from router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import MODELS, PROFILES

PROMPTS = [
    "What is the capital of Australia?",
    "Prove that there are infinitely many primes, then generalize the argument to primes of the form 4k+3.",
    "Write a haiku about autumn.",
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:",
]


TEST_LOG = Path(tempfile.mkdtemp(prefix="router-test-")) / "decisions.db"


def settings(**kw) -> Settings:
    base = dict(host="127.0.0.1", port=0, model_dir=MODELS, profiles_path=PROFILES,
                device="cpu", intra_op_threads=1, grace_seconds=5.0,
                decision_log_url=f"sqlite:///{TEST_LOG}", decision_log_salt="test-salt")
    return Settings(**(base | kw))


@pytest.fixture
async def server():
    async with build_server(settings()) as srv:
        yield srv


@contextlib.contextmanager
def engine_held(srv: RouterServer) -> Iterator[threading.Event]:
    """Every batch waits in the engine thread until the gate opens (or the block exits), so calls
    pile up in the queue however fast the machine is. No call is decided on the loop meanwhile
    (RouterServer._route_now): every one goes through the batcher."""
    gate = threading.Event()
    engine = srv.engine
    run = engine.route_batch

    def held(queries):
        gate.wait(30)
        return run(queries)

    engine.route_batch = held  # type: ignore[method-assign]
    srv.route_on_loop = False
    try:
        yield gate
    finally:
        gate.set()
        srv.route_on_loop = srv.settings.route_on_loop
        del engine.route_batch  # the class's method again


async def wait_for(predicate, timeout: float = 30.0) -> None:
    """Poll `predicate` every 5 ms; fail the test if it is still false after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout:.0f} s")
        await asyncio.sleep(0.005)


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield router_pb2_grpc.RouterStub(channel)


async def test_route_answers_with_tier_scores_and_confidence(stub, server):
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], request_id="r-1"))
    assert resp.tier in ("budget", "mid", "frontier")
    assert [s.tier for s in resp.scores] == ["budget", "mid", "frontier"]
    assert resp.model == {s.tier: s.model for s in resp.scores}[resp.tier]
    assert resp.scores[0].win_probability == pytest.approx(0.5)
    for s in resp.scores:
        assert 0.0 < s.quality < 1.0 and 0.0 < s.win_probability < 1.0
    chosen = next(s for s in resp.scores if s.tier == resp.tier)
    assert resp.confidence == pytest.approx(chosen.quality)
    assert resp.reason in ("classifier", "fallback")
    assert resp.model_version == server.engine.version
    model = server.engine.model  # the default profile cascades: either stage may answer
    assert resp.encoder in {model.manifest.encoder.name, model.first_stage and model.first_stage.encoder_spec.name}
    assert resp.profile == "default" and resp.request_id == "r-1"
    assert len(resp.decision_id) == 32


async def test_route_follows_the_floor(stub):
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], profile="routellm-pair"))
    weak, strong = resp.scores
    threshold = 0.7  # config/profiles.toml
    expected = "weak" if weak.quality >= threshold else "strong"
    assert resp.tier == expected


async def test_messages_are_routed(stub):
    req = router_pb2.RouteRequest(messages=[
        router_pb2.Message(role="system", content="You are terse."),
        router_pb2.Message(role="user", content=PROMPTS[1]),
    ])
    resp = await stub.Route(req)
    assert resp.tier and len(resp.scores) == 3


async def test_route_batch_keeps_order_and_matches_single_calls(stub):
    reqs = [router_pb2.RouteRequest(prompt=p, request_id=str(i)) for i, p in enumerate(PROMPTS)]
    batch = await stub.RouteBatch(router_pb2.RouteBatchRequest(requests=reqs))
    assert [r.request_id for r in batch.responses] == ["0", "1", "2", "3"]
    for req, got in zip(reqs, batch.responses, strict=True):
        single = await stub.Route(req)
        for a, b in zip(got.scores, single.scores, strict=True):
            # Dynamic int8 quantization scales activations per tensor, so a prompt's scores
            # move slightly with its batch mates (measured up to ~0.005); bound that drift.
            assert a.quality == pytest.approx(b.quality, abs=0.02)
        if all(abs(s.quality - 0.7) > 0.02 for s in single.scores):  # the default profile's floor
            assert got.tier == single.tier


async def test_concurrent_callers_each_get_their_own_answer(stub, server):
    singles = [await stub.Route(router_pb2.RouteRequest(prompt=p)) for p in PROMPTS]
    with engine_held(server) as gate:  # the first batch waits, so the others queue up behind it
        calls = [asyncio.ensure_future(stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[i % 4], request_id=str(i))))
                 for i in range(64)]
        await wait_for(lambda: server.batcher.queued > 1)
        gate.set()
        results = await asyncio.gather(*calls)
    for i, r in enumerate(results):
        assert r.request_id == str(i)
        assert r.scores[0].quality == pytest.approx(singles[i % 4].scores[0].quality, abs=0.02)
    assert server.batcher.batched_items > server.batcher.batches, "no batch of more than one formed"


async def test_health_is_serving_after_warmup(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "router.v1.Router"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _reflect(port: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        services = db.get_services()
        method = pool.FindServiceByName("router.v1.Router").FindMethodByName("Route")
        assert method.input_type.fields_by_name["prompt"].number == 1
        return list(services)


async def test_reflection_lists_and_describes_the_service(server):
    services = await asyncio.to_thread(_reflect, server.port)  # sync client: off the server's loop
    assert "router.v1.Router" in services and "grpc.health.v1.Health" in services


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        ({}, "prompt: required"),
        ({"prompt": "   \n"}, "prompt: must contain non-whitespace text"),
        ({"prompt": "x", "messages": [router_pb2.Message(role="user", content="y")]},
         "prompt, messages: set exactly one"),
        ({"prompt": "x", "profile": "no-such"}, "profile: unknown profile 'no-such'"),
        ({"messages": [router_pb2.Message(role="robot", content="y")]}, "messages[0].role"),
        ({"messages": [router_pb2.Message(role="user", content="")]}, "messages: every message content is empty"),
        ({"prompt": "x", "tenant": "t" * 300}, "tenant: at most 256 characters"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(stub, request_kwargs, field):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Route(router_pb2.RouteRequest(**request_kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


async def test_bad_entry_in_a_batch_names_its_index(stub):
    reqs = [router_pb2.RouteRequest(prompt="fine"), router_pb2.RouteRequest(prompt="")]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.RouteBatch(router_pb2.RouteBatchRequest(requests=reqs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[1].prompt" in e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.RouteBatch(router_pb2.RouteBatchRequest())
    assert "requests: between 1 and" in e.value.details()


async def test_invalid_utf8_is_invalid_argument_naming_the_field(server):
    # Hand-encode a RouteRequest whose messages[0].content is not UTF-8: protobuf clients refuse to.
    content = b"\x12" + bytes([4]) + b"\xff\xfe\xfd\xfc"  # Message.content (field 2)
    role = b"\x0a\x04user"  # Message.role (field 1)
    message = role + content
    raw = b"\x12" + bytes([len(message)]) + message  # RouteRequest.messages (field 2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary("/router.v1.Router/Route", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(raw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].content: not valid UTF-8" in e.value.details()


async def test_overlong_prompt_is_truncated_not_rejected(stub):
    resp = await stub.Route(router_pb2.RouteRequest(prompt="word " * 50_000))
    assert resp.tier


async def test_a_quiet_server_routes_on_the_loop_and_still_batches_under_load():
    """Calls one at a time find the server quiet: the engine runs on the event loop's thread,
    with the answers the batcher path gives. 64 calls at once go through the batcher, in batches."""
    answers = {}
    for on_loop in (True, False):
        async with build_server(settings(route_on_loop=on_loop)) as srv, \
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            ran_on: list[str] = []
            run = srv.engine.route_batch

            def spy(queries, run=run, ran_on=ran_on):  # type: ignore[no-untyped-def]
                ran_on.append(threading.current_thread().name)
                return run(queries)

            srv.engine.route_batch = spy  # type: ignore[method-assign]
            got = [await stub.Route(router_pb2.RouteRequest(prompt=p)) for p in PROMPTS]
            answers[on_loop] = [(r.encoder, r.tier, [s.quality for s in r.scores]) for r in got]
            here = threading.current_thread().name
            assert ran_on == ([here] if on_loop else ["engine_0"]) * len(PROMPTS)
            assert srv.batcher.batches == srv.batcher.batched_items == len(PROMPTS)
            if on_loop:
                await asyncio.gather(*[stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[i % 4])) for i in range(64)])
                batches, items = srv.batcher.batches - len(PROMPTS), srv.batcher.batched_items - len(PROMPTS)
                assert items == 64 and batches < 32, f"64 calls at once ran as {batches} batches"
    assert answers[True] == answers[False]


@pytest.mark.parametrize("on_loop", [True, False])
async def test_an_engine_failure_is_internal_for_that_call_and_the_server_goes_on(on_loop, caplog):
    async with build_server(settings(route_on_loop=on_loop)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        def broken(queries):  # type: ignore[no-untyped-def]
            raise RuntimeError("engine exploded")

        srv.engine.route_batch = broken  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0]))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "see server log" in err.value.details()
        assert "engine exploded" in caplog.text  # the traceback is in the log, not in the answer
        del srv.engine.route_batch
        assert (await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0]))).tier


async def test_full_queue_gets_resource_exhausted_at_once():
    async with build_server(settings(max_queue=2, max_batch_size=1)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with engine_held(srv) as gate:
            calls = [asyncio.ensure_future(stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1])))
                     for _ in range(40)]
            # One batch of one in the engine and two queued: the other 37 are refused at once.
            await wait_for(lambda: sum(c.done() for c in calls) >= 37)
            gate.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
    codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(codes) == 37 and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert sum(isinstance(r, router_pb2.RouteResponse) for r in results) == 3


async def test_graceful_stop_finishes_in_flight_calls():
    async with build_server(settings()) as srv, grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with engine_held(srv) as gate:
            calls = [asyncio.ensure_future(stub.Route(router_pb2.RouteRequest(prompt=p)))
                     for p in PROMPTS * 8]
            await wait_for(lambda: srv.batcher.queued + srv.batcher.batched_items == len(calls))
            stopping = asyncio.ensure_future(srv.stop(grace=10))
            await asyncio.sleep(0.2)
            assert not stopping.done(), "stop() returned while admitted calls were still waiting"
            gate.set()
            await stopping
            results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if not isinstance(r, router_pb2.RouteResponse)]
    assert not errors, errors


async def test_broken_model_refuses_to_start(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "head.onnx").write_bytes(b"not an onnx file")
    from router.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="sha256"):
        build_server(settings(model_dir=broken))


async def test_a_failed_start_stops_the_half_started_server(monkeypatch):
    def broken_warm(engine, profile):
        raise RuntimeError("warm-up failed")

    srv = build_server(settings())
    monkeypatch.setattr(srv, "_warm", broken_warm)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        async with srv:
            pass
    # the listener bound before warm-up was closed: the port can be bound again
    with socket.socket() as s:
        s.bind(("127.0.0.1", srv.port))


async def test_the_warmed_up_heap_is_frozen_out_of_the_collector():
    # Full collections over everything alive after warm-up took 30-55 ms with the GIL held
    # (docs/benchmarks.md, "Collector pauses"); the server freezes that heap when it starts.
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    async with build_server(settings()):
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen  # modules, the model, gRPC's objects
