"""ReportOutcome and the decision log on the real server: idempotency, errors, privacy, kill -9."""

from __future__ import annotations

import signal

import grpc
import numpy as np
import pytest

from router.artifacts import read_manifest, resolve_model_dir
from router.decisionlog import DecisionLog, decode_embedding
from router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import MODELS
from tests.integration.serveproc import server_env, start_server
from tests.integration.test_server import PROMPTS, server, settings, stub  # noqa: F401  (fixtures)


async def test_outcome_by_decision_id_is_idempotent(stub):  # noqa: F811
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], request_id="req-1", workflow="wf"))
    first = await stub.ReportOutcome(router_pb2.OutcomeRequest(decision_id=resp.decision_id, success=True,
                                                               cost_usd=0.001, tokens_out=40))
    assert first.created and first.decision_id == resp.decision_id and first.message == "recorded"
    again = await stub.ReportOutcome(router_pb2.OutcomeRequest(decision_id=resp.decision_id, success=False))
    assert not again.created and "already recorded" in again.message


async def test_outcome_by_request_id_names_the_newest_decision(stub):  # noqa: F811
    await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], request_id="req-2"))
    newest = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], request_id="req-2"))
    ack = await stub.ReportOutcome(router_pb2.OutcomeRequest(request_id="req-2", score=0.25))
    assert ack.created and ack.decision_id == newest.decision_id


@pytest.mark.parametrize(
    "kwargs, code, text",
    [
        ({"decision_id": "nope", "success": True}, grpc.StatusCode.NOT_FOUND, "no logged decision with decision_id"),
        ({"request_id": "nope", "success": True}, grpc.StatusCode.NOT_FOUND, "request_id 'nope'"),
        ({"success": True}, grpc.StatusCode.INVALID_ARGUMENT, "decision_id: give a decision id or a request id"),
        ({"decision_id": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "success: give success or score"),
        ({"decision_id": "x", "score": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "score: 1.5 is not in [0, 1]"),
        ({"decision_id": "x", "success": True, "cost_usd": -1}, grpc.StatusCode.INVALID_ARGUMENT, "cost_usd"),
        ({"decision_id": "x", "success": True, "label": "l" * 300}, grpc.StatusCode.INVALID_ARGUMENT, "label"),
    ],
)
async def test_bad_reports(stub, kwargs, code, text):  # noqa: F811
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ReportOutcome(router_pb2.OutcomeRequest(**kwargs))
    assert e.value.code() == code and text in e.value.details()


async def test_every_decision_is_logged_without_the_prompt(tmp_path):
    from router.server import build_server

    url = f"sqlite:///{tmp_path / 'log.db'}"
    async with build_server(settings(decision_log_url=url, decision_log_salt="s1")) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], workflow="wf", tenant="t"))
        batch = await stub.RouteBatch(router_pb2.RouteBatchRequest(
            requests=[router_pb2.RouteRequest(prompt=p) for p in PROMPTS]))
    # leaving the block stopped the server, which flushed the decision buffer
    with DecisionLog(url, salt="s1") as dlog:
        assert dlog.count() == 1 + len(batch.responses)
        rec = dlog.decision(resp.decision_id)
    assert rec is not None
    assert (rec.tier, rec.model, rec.reason, rec.workflow, rec.tenant) == (
        resp.tier, resp.model, resp.reason, "wf", "t")
    assert rec.profile_version == resp.profile_version and rec.model_version == resp.model_version
    assert rec.encoder == resp.encoder != ""
    assert rec.propensity == 1.0 and rec.input_tokens == resp.input_tokens
    assert [s.quality for s in rec.scores] == pytest.approx([s.quality for s in resp.scores])
    assert rec.prompt is None  # privacy by default: only the embedding, a salted hash and counts
    assert rec.prompt_hash == DecisionLog(url, salt="s1").hash_prompt(PROMPTS[1])
    assert rec.prompt_hash != DecisionLog(url, salt="s2").hash_prompt(PROMPTS[1])
    emb = decode_embedding(rec.embedding)  # the embedding of the stage that decided (the default cascades)
    manifest = read_manifest(resolve_model_dir(MODELS))
    dims = {s.encoder.name: s.encoder.dim for s in (manifest, manifest.cascade) if s is not None}
    assert emb.shape == (dims[rec.encoder],) and abs(float(np.linalg.norm(emb)) - 1.0) < 0.01


def test_an_acknowledged_outcome_survives_kill_9(tmp_path):
    env = server_env(tmp_path)
    proc, port = start_server(env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            resp = stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[2], request_id="k9"))
            ack = stub.ReportOutcome(router_pb2.OutcomeRequest(decision_id=resp.decision_id, success=False,
                                                               rework=True, rework_cost=0.5))
            assert ack.created
            proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with DecisionLog(env["ROUTER_DECISION_LOG_URL"], salt="test") as dlog:
        out = dlog.outcome(resp.decision_id)
        assert out is not None and out.success is False and out.rework and out.rework_cost == 0.5
        assert dlog.decision(resp.decision_id) is not None


async def test_an_outcome_sent_to_another_replica_waits_for_the_decision_to_be_committed(tmp_path):
    """Replicas sharing a log commit decisions in the background, so an outcome reported at once
    to another replica can arrive before its decision: that replica keeps looking for up to
    `outcome_wait_seconds` instead of answering NOT_FOUND."""
    from router.server import build_server

    shared = dict(decision_log_url=f"sqlite:///{tmp_path / 'shared.db'}", decision_log_salt="s")
    async with build_server(settings(**shared)) as a, \
            build_server(settings(**shared, outcome_wait_seconds=0)) as impatient, \
            build_server(settings(**shared, outcome_wait_seconds=10)) as patient:
        assert a.decision_log is not None
        a.decision_log.flush_interval_s = 1.5  # A's writer commits 1.5 s after the decision at the earliest
        channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
                    for name, srv in (("a", a), ("impatient", impatient), ("patient", patient))}
        stubs = {name: router_pb2_grpc.RouterStub(ch) for name, ch in channels.items()}
        decided = await stubs["a"].Route(router_pb2.RouteRequest(prompt=PROMPTS[0], request_id="r-a"))
        with pytest.raises(grpc.aio.AioRpcError) as e:  # without the wait, the race is lost
            await stubs["impatient"].ReportOutcome(
                router_pb2.OutcomeRequest(decision_id=decided.decision_id, success=True))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert a.decision_log.pending == 1  # still only in A's buffer
        ack = await stubs["patient"].ReportOutcome(router_pb2.OutcomeRequest(request_id="r-a", score=0.5))
        assert ack.created and ack.decision_id == decided.decision_id
        assert a.decision_log.pending == 0
        with pytest.raises(grpc.aio.AioRpcError) as e:  # an id no replica logged is still NOT_FOUND
            await stubs["impatient"].ReportOutcome(router_pb2.OutcomeRequest(decision_id="nope", success=True))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        for ch in channels.values():
            await ch.close()
    with DecisionLog(shared["decision_log_url"], salt="s") as dlog:
        stored = dlog.outcome(decided.decision_id)
    assert stored is not None and stored.value == 0.5
