"""Arbitrary requests against the real server process: every answer is a decision or a clear error.

Hypothesis draws RouteRequests, RouteBatchRequests and OutcomeRequests over every field (any
text, NaN and infinite numbers, unknown tiers and profiles, escalations) and valid requests with
their outcomes. The server must answer each one with a decision whose figures are in range, or
with INVALID_ARGUMENT / FAILED_PRECONDITION / NOT_FOUND and a message that names the field;
never UNKNOWN or INTERNAL, never a hang, and it must still be serving at the end. Draws are
derandomized, so a failure reproduces run after run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.v1 import router_pb2 as pb
from router.v1 import router_pb2_grpc
from tests.integration.serveproc import server_env, start_server

pytestmark = pytest.mark.slow

TIERS = ["budget", "mid", "frontier"]
PROFILES = ["default", "routellm-pair", "budget", "rework", "capped-frontier"]
# "field: what is wrong", where the field may be a path ("requests[3].escalation.failed_tier") or
# several of them ("prompt, messages: set exactly one").
FIELD = re.compile(r"^[\w\[\]\.]+(, [\w\[\]\.]+)*: \S")
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

any_text = st.text(max_size=200)
some_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=300).filter(str.strip)
tier = st.sampled_from(["", *TIERS, "weak", "strong", "nope", " budget", "BUDGET"])
any_float = st.floats(width=32)  # NaN, infinities and huge values included
any_double = st.floats()
message = st.builds(pb.Message, role=st.sampled_from(["user", "assistant", "system", "", "robot"]),
                    content=any_text)
escalation = st.builds(pb.Escalation, failed_tier=tier, failure=st.sampled_from(["", "timeout", "quality", "x"]),
                       previous_escalations=st.integers(0, 2**32 - 1))
any_route = st.fixed_dictionaries({}, optional=dict(
    prompt=any_text, messages=st.lists(message, max_size=4),
    profile=st.sampled_from(["", *PROFILES, "no-such"]), workflow=any_text, tenant=any_text,
    request_id=any_text, stage=any_text, min_tier=tier, max_tier=tier, quality_floor=any_float,
    max_cost=any_double, expected_output_tokens=st.integers(0, 2**32 - 1), escalation=escalation,
)).map(lambda kw: pb.RouteRequest(**kw))
PROFILE_TIERS = {p: TIERS for p in PROFILES} | {"routellm-pair": ["weak", "strong"]}


@st.composite
def valid_route(draw: st.DrawFn) -> pb.RouteRequest:
    """A request every server must decide: known profile, its own tiers, min <= max, sane numbers."""
    text = draw(st.one_of(
        st.fixed_dictionaries(dict(prompt=some_text)),
        st.fixed_dictionaries(dict(messages=st.lists(
            st.builds(pb.Message, role=st.sampled_from(["user", "assistant", "system"]), content=some_text),
            min_size=1, max_size=4))),
    ))
    kw = draw(st.fixed_dictionaries({}, optional=dict(
        quality_floor=st.floats(0, 1, width=32), max_cost=st.floats(0, 1),
        expected_output_tokens=st.integers(0, 1_000_000), request_id=st.text(max_size=40),
    )))
    profile = draw(st.sampled_from(["", *PROFILES]))
    tiers = PROFILE_TIERS.get(profile, TIERS)
    lo, hi = sorted(draw(st.lists(st.sampled_from(range(len(tiers))), min_size=2, max_size=2)))
    if draw(st.booleans()):
        kw["min_tier"] = tiers[lo]
    if draw(st.booleans()):
        kw["max_tier"] = tiers[hi]
    return pb.RouteRequest(**text, **kw, profile=profile)


outcome_fields = dict(success=st.booleans(), score=st.floats(0, 1, width=32), rework=st.booleans(),
                      cost_usd=st.floats(0, 10), latency_ms=st.floats(0, 1e6), tokens_in=st.integers(0, 10**6),
                      tokens_out=st.integers(0, 10**6))
any_outcome = st.fixed_dictionaries({}, optional=dict(
    decision_id=any_text, request_id=any_text, success=st.booleans(), score=any_float, rework=st.booleans(),
    rework_cost=any_double, tokens_in=st.integers(0, 2**32 - 1), tokens_out=st.integers(0, 2**32 - 1),
    cost_usd=any_double, latency_ms=any_double, label=any_text,
)).map(lambda kw: pb.OutcomeRequest(**kw))


@pytest.fixture(scope="module")
def channel(tmp_path_factory) -> Iterator[grpc.Channel]:
    proc, port = start_server(server_env(tmp_path_factory.mktemp("fuzz")))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
            # whatever came before, the server is still up and serving
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(channel)


def check_decision(resp: pb.RouteResponse) -> None:
    tiers = [s.tier for s in resp.scores]
    assert resp.tier in tiers and resp.decision_id and resp.reason
    assert 0.0 <= resp.confidence <= 1.0
    assert math.isfinite(resp.expected_cost) and resp.expected_cost >= 0
    for s in resp.scores:
        assert 0.0 <= s.quality <= 1.0 and 0.0 <= s.win_probability <= 1.0, s
        assert math.isfinite(s.expected_cost) and s.expected_cost >= 0, s


def call(method, request) -> object | None:
    """The answer, or None after a clear error; anything else fails the test."""
    try:
        return method(request, timeout=30)
    except grpc.RpcError as e:
        assert e.code() in CLEAR, (e.code(), e.details(), request)
        assert FIELD.match(e.details() or ""), (e.details(), request)
        return None


@FUZZ
@given(request=any_route)
def test_any_route_request_is_decided_or_refused_naming_the_field(stub, request):
    resp = call(stub.Route, request)
    if resp is not None:
        check_decision(resp)


@FUZZ
@given(requests=st.lists(any_route, max_size=12))
def test_any_batch_is_decided_or_refused_naming_the_entry(stub, requests):
    resp = call(stub.RouteBatch, pb.RouteBatchRequest(requests=requests))
    if resp is not None:
        assert len(resp.responses) == len(requests)
        for r in resp.responses:
            check_decision(r)


@FUZZ
@given(request=any_outcome)
def test_any_outcome_report_is_recorded_or_refused(stub, request):
    try:
        stub.ReportOutcome(request, timeout=30)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            assert "no logged decision with" in (e.details() or "")
        else:
            assert e.code() in CLEAR and FIELD.match(e.details() or ""), (e.code(), e.details())


def bad(field: str, values: st.SearchStrategy) -> st.SearchStrategy[tuple[str, dict]]:
    return values.map(lambda v: (field, {field: v}))


# One field of a valid request set to a value it may not take (the edge cases always in the draw).
bad_field = st.one_of(
    bad("quality_floor", st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.01, 1.01]),
                                   st.floats(width=32).filter(lambda x: not 0 <= x <= 1))),
    bad("max_cost", st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -1e-9]),
                              st.floats().filter(lambda x: not 0 <= x < math.inf))),
    bad("min_tier", st.sampled_from(["nope", " budget", "BUDGET", "Strong"])),
    bad("max_tier", st.sampled_from(["nope", " budget", "BUDGET", "Strong"])),
    bad("profile", st.just("no-such")),
    bad("expected_output_tokens", st.integers(1_000_001, 2**32 - 1)),
    bad("tenant", st.text(min_size=257, max_size=300)),
)


@FUZZ
@given(request=valid_route(), wrong=bad_field)
def test_a_valid_request_with_one_bad_field_is_refused_naming_it(stub, request, wrong):
    field, value = wrong
    kw = {f.name: v for f, v in request.ListFields()} | value
    with pytest.raises(grpc.RpcError) as e:
        stub.Route(pb.RouteRequest(**kw), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert (e.value.details() or "").startswith(field + ":"), (e.value.details(), kw)


@FUZZ
@given(request=valid_route(), outcome=st.fixed_dictionaries({}, optional=outcome_fields))
def test_a_valid_request_respects_its_tier_bounds_and_takes_one_outcome(stub, request, outcome):
    resp = stub.Route(request, timeout=30)
    check_decision(resp)
    tiers = [s.tier for s in resp.scores]
    if request.min_tier:
        assert tiers.index(resp.tier) >= tiers.index(request.min_tier), resp
    if request.max_tier:
        assert tiers.index(resp.tier) <= tiers.index(request.max_tier), resp
    if "success" not in outcome and "score" not in outcome:
        outcome["success"] = True
    first = stub.ReportOutcome(pb.OutcomeRequest(decision_id=resp.decision_id, **outcome), timeout=30)
    again = stub.ReportOutcome(pb.OutcomeRequest(decision_id=resp.decision_id, **outcome), timeout=30)
    assert first.created and not again.created
