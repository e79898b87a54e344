"""A cascade over gRPC: a profile with cascade_margin on a two-stage version, answers and log."""

from __future__ import annotations

import grpc

from router import metrics
from router.decisionlog import DecisionLog
from router.server import build_server
from router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import plain_profiles
from tests.integration.test_server import settings
from tests.unit.test_cascade import PROMPTS, assemble


def counted(stage: str) -> float:
    return metrics.CASCADE.labels(stage=stage)._value.get()  # type: ignore[attr-defined]


CASCADE_PROFILE = """

[profiles.cascade]
description = "The default's tiers and floor; the first stage decides what it is sure of."
mode = "floor"
floor = 0.7
cascade_margin = 0.03
tiers = [
  { name = "budget", model = "Mistral-7B-Instruct-v0.2" },
  { name = "mid", model = "mixtral-8x7b-instruct-v0.1" },
  { name = "frontier", model = "gpt-4-1106-preview" },
]
"""


async def test_a_cascade_profile_is_answered_by_both_stages_and_logged_with_its_encoder(tmp_path):
    version = assemble(tmp_path)
    profiles = plain_profiles(tmp_path / "config")  # `default` without its cascade_margin: the main encoder
    profiles.write_text(profiles.read_text("utf-8") + CASCADE_PROFILE, "utf-8")
    log_url = f"sqlite:///{tmp_path / 'decisions.db'}"
    before = {stage: counted(stage) for stage in ("first", "main")}  # counts live traffic only, not warm-up
    async with build_server(settings(model_dir=version, profiles_path=profiles, decision_log_url=log_url)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            cascaded = await stub.RouteBatch(router_pb2.RouteBatchRequest(
                requests=[router_pb2.RouteRequest(prompt=p, profile="cascade") for p in PROMPTS]))
            plain = await stub.RouteBatch(router_pb2.RouteBatchRequest(
                requests=[router_pb2.RouteRequest(prompt=p) for p in PROMPTS]))
            single = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], profile="cascade"))
    by_stage = {r.encoder for r in cascaded.responses}
    assert by_stage == {"all-MiniLM-L6-v2", "all-MiniLM-L6-v2-first2"}
    assert {r.encoder for r in plain.responses} == {"all-MiniLM-L6-v2-first2"}
    assert single.encoder in by_stage and all(r.profile == "cascade" for r in cascaded.responses)
    first = sum(r.encoder == "all-MiniLM-L6-v2" for r in [*cascaded.responses, single])
    assert counted("first") - before["first"] == first
    assert counted("main") - before["main"] == len(cascaded.responses) + 1 - first
    with DecisionLog(log_url, salt="test-salt") as dlog:
        for resp in [*cascaded.responses, *plain.responses]:
            rec = dlog.decision(resp.decision_id)
            assert rec is not None and rec.encoder == resp.encoder and rec.tier == resp.tier
