"""The profile part of the Route contract on the real server: costs, rules, overrides, escalation, hot reload."""

from __future__ import annotations

import shutil

import grpc
import pytest

from router.server import build_server
from router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import PROFILES
from tests.integration.test_server import PROMPTS, settings, wait_for


@pytest.fixture
async def live(tmp_path):
    """A server on a copy of the shipped profiles, checked for changes every 50 ms."""
    shutil.copy(PROFILES, tmp_path / "profiles.toml")
    shutil.copy(PROFILES.parent / "prices.toml", tmp_path / "prices.toml")
    async with build_server(settings(profiles_path=tmp_path / "profiles.toml", profiles_reload_seconds=0.05)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield srv, router_pb2_grpc.RouterStub(channel), tmp_path / "profiles.toml"


async def test_every_answer_carries_costs_and_the_profile_version(live):
    srv, stub, _ = live
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], expected_output_tokens=500))
    assert resp.output_tokens == 500 and resp.input_tokens > 10
    by_tier = {s.tier: s for s in resp.scores}
    # frontier gpt-4-1106-preview: 10 / 30 USD per million tokens (config/prices.toml)
    assert by_tier["frontier"].expected_cost == pytest.approx((resp.input_tokens * 10 + 500 * 30) / 1e6)
    assert resp.frontier_cost == pytest.approx(by_tier["frontier"].expected_cost)
    assert resp.expected_cost == pytest.approx(by_tier[resp.tier].expected_cost)
    assert resp.profile_version == srv.profiles.current.version and len(resp.profile_version) == 12
    assert resp.propensity == 1.0  # the profile does not explore


async def test_rules_decide_and_are_named(live):
    _, stub, _ = live
    resp = await stub.Route(router_pb2.RouteRequest(prompt="Hi", workflow="legal-review"))
    assert (resp.tier, resp.reason) == ("frontier", "rule:legal-review-frontier")
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], stage="summarize", min_tier="frontier"))
    assert resp.tier == "mid"  # the rule's maximum beats the request's minimum


async def test_overrides(live):
    _, stub, _ = live
    resp = await stub.Route(router_pb2.RouteRequest(prompt="Hi", min_tier="frontier"))
    assert resp.tier == "frontier"
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], quality_floor=0.0))
    assert resp.tier == "budget" and resp.reason == "override:quality_floor"
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1], max_cost=0.0))
    assert resp.tier == "budget"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_tier": "gold"}, "min_tier: unknown tier 'gold'"),
        ({"max_tier": "gold"}, "max_tier: unknown tier 'gold'"),
        ({"min_tier": "frontier", "max_tier": "budget"}, "min_tier: 'frontier' is above max_tier"),
        ({"quality_floor": 1.5}, "quality_floor: must be in [0, 1]"),
        ({"quality_floor": float("nan")}, "quality_floor: must be in [0, 1]"),
        ({"max_cost": -1.0}, "max_cost: must be a finite number"),
        ({"expected_output_tokens": 2_000_000}, "expected_output_tokens: at most"),
        ({"escalation": router_pb2.Escalation()}, "escalation.failed_tier: required"),
        ({"escalation": router_pb2.Escalation(failed_tier="gold")}, "escalation.failed_tier: unknown tier"),
    ],
)
async def test_bad_overrides_are_invalid_argument_naming_the_field(live, kwargs, field):
    _, stub, _ = live
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Route(router_pb2.RouteRequest(prompt="x", **kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


async def test_escalation(live):
    _, stub, _ = live
    resp = await stub.Route(router_pb2.RouteRequest(
        prompt="Hi", escalation=router_pb2.Escalation(failed_tier="budget", failure="json-invalid")))
    assert resp.tier in ("mid", "frontier") and resp.reason == "escalation"
    resp = await stub.Route(router_pb2.RouteRequest(prompt="Hi", escalation=router_pb2.Escalation(failed_tier="mid")))
    assert resp.tier == "frontier"
    for esc, text in [
        (router_pb2.Escalation(failed_tier="frontier"), "most capable tier"),
        (router_pb2.Escalation(failed_tier="budget", previous_escalations=2), "allows 2 escalations"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Route(router_pb2.RouteRequest(prompt="Hi", escalation=esc))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and text in e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:  # capped by a rule: nothing open above mid
        await stub.Route(router_pb2.RouteRequest(
            prompt="Hi", stage="summarize", escalation=router_pb2.Escalation(failed_tier="mid")))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rule:summaries-not-above-mid" in e.value.details()


async def _wait_for_version(srv, old: str) -> str:
    await wait_for(lambda: srv.profiles.current.version != old)
    return srv.profiles.current.version


async def test_hot_reload_swaps_whole_files_and_keeps_the_last_good_one(live):
    srv, stub, path = live
    v1 = (await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0]))).profile_version
    # a broken edit (unknown tier in a rule) is refused: the server keeps answering with v1
    path.write_text(path.read_text().replace('max_tier = "mid"', 'max_tier = "middle"'))
    await wait_for(lambda: srv.profiles.last_error)  # the watcher polls every 50 ms
    assert srv.profiles.last_error and "rules.1.max_tier: 'middle'" in srv.profiles.last_error
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], stage="summarize"))
    assert resp.profile_version == v1
    # a good edit lands without a restart: the floor 0.0 sends everything to the budget tier
    text = path.read_text().replace('max_tier = "middle"', 'max_tier = "mid"')
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text.replace("floor = 0.7", "floor = 0.0", 1))
    tmp.replace(path)  # how deployments should write it: atomically
    v2 = await _wait_for_version(srv, v1)
    assert v2 != v1
    resp = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1]))
    assert (resp.profile_version, resp.tier) == (v2, "budget")
    # re-pricing is one edit of the catalog, picked up too
    prices = path.parent / "prices.toml"
    prices.write_text(prices.read_text().replace("input = 10.00\noutput = 30.00", "input = 5.00\noutput = 15.00", 1))
    v3 = await _wait_for_version(srv, v2)
    resp = await stub.Route(router_pb2.RouteRequest(prompt="Hi", expected_output_tokens=1000))
    assert resp.profile_version == v3 != v2
    assert resp.frontier_cost == pytest.approx((resp.input_tokens * 5 + 1000 * 15) / 1e6)
