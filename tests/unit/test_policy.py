"""Decision modes with known probabilities, rule precedence, overrides, escalation, exploration."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import scoring as S
from router.policy import RequestContext, decide, settled_within
from router.profiles import Profile, Rule, Tier

# budget 1/2 USD per M tokens, mid 3/4, frontier 10/30
TIERS = (
    Tier(name="budget", model="b", price_input=1.0, price_output=2.0),
    Tier(name="mid", model="m", price_input=3.0, price_output=4.0),
    Tier(name="frontier", model="f", price_input=10.0, price_output=30.0),
)


def profile(**kw: Any) -> Profile:
    kw.setdefault("tiers", TIERS)
    kw.setdefault("expected_output_tokens", 1000)
    return Profile(name="p", **kw)


def run(p: Profile, quality: list[list[float]], contexts: list[RequestContext] | None = None,
        tokens: int = 1000, texts: list[str] | None = None, **kw: Any):
    q = np.array(quality, np.float32)
    n = len(q)
    return decide(p, q, np.full(n, tokens, np.int64), texts or ["x"] * n,
                  contexts or [RequestContext()] * n, **kw)


def tiers_of(decided) -> list[str]:
    return [c.tier for c in decided.choices]


def test_costs_follow_the_prices():
    d = run(profile(), [[0.9, 0.9, 0.9]], tokens=2000)
    # 2000 in + 1000 out: budget 2000*1 + 1000*2 = 4000 / 1e6
    assert d.costs[0] == pytest.approx([0.004, 0.010, 0.050])
    assert d.choices[0].cost == pytest.approx(0.004)


def test_floor_mode_cheapest_clearing_else_fallback():
    d = run(profile(floor=0.5), [[0.6, 0.7, 0.9], [0.3, 0.55, 0.9], [0.1, 0.2, 0.45]])
    assert tiers_of(d) == ["budget", "mid", "frontier"]
    assert [c.reason for c in d.choices] == ["classifier", "classifier", "fallback"]
    assert [c.confidence for c in d.choices] == pytest.approx([0.6, 0.55, 0.45])


def test_share_mode_uses_per_tier_floors():
    p = profile(mode="share", shares={"budget": 0.5, "mid": 0.3, "frontier": 0.2}, floors=(0.8, 0.6, 0.0))
    d = run(p, [[0.85, 0.9, 0.9], [0.7, 0.65, 0.9], [0.7, 0.5, 0.9]])
    assert tiers_of(d) == ["budget", "mid", "frontier"]


def test_budget_mode_trades_quality_for_cost():
    q = [[0.5, 0.6, 0.9]]  # costs per 1k requests: 3, 7, 40 USD
    assert tiers_of(run(profile(mode="budget", budget_per_1k=5, budget_lambda=0.0), q)) == ["frontier"]
    # lam 0.005: utilities 0.5-0.015, 0.6-0.035, 0.9-0.2 = 0.485, 0.565, 0.70 -> frontier
    assert tiers_of(run(profile(mode="budget", budget_per_1k=5, budget_lambda=0.005), q)) == ["frontier"]
    # lam 0.02: 0.44, 0.46, 0.10 -> mid
    assert tiers_of(run(profile(mode="budget", budget_per_1k=5, budget_lambda=0.02), q)) == ["mid"]
    # lam 1: cheapest
    assert tiers_of(run(profile(mode="budget", budget_per_1k=5, budget_lambda=1.0), q)) == ["budget"]


def test_rework_mode_minimizes_price_plus_expected_rework():
    q = [[0.5, 0.8, 0.95]]  # prices 0.003, 0.007, 0.040 USD
    # rework 0.01: 0.003+0.005=0.008, 0.007+0.002=0.009, 0.040+0.0005 -> budget
    assert tiers_of(run(profile(mode="rework", rework_cost=0.01), q)) == ["budget"]
    # rework 0.1: 0.053, 0.027, 0.045 -> mid
    assert tiers_of(run(profile(mode="rework", rework_cost=0.1), q)) == ["mid"]
    # rework 10: 5.003, 2.007, 0.54 -> frontier
    assert tiers_of(run(profile(mode="rework", rework_cost=10.0), q)) == ["frontier"]


RULES = (
    Rule(name="legal", workflow="legal-review", pin_tier="frontier"),
    Rule(name="legal-2", workflow=["legal-review", "audit"], pin_tier="mid"),
    Rule(name="summaries", stage="summarize", max_tier="mid"),
    Rule(name="long", min_tokens=5000, min_tier="mid"),
    Rule(name="secret", pattern=r"\bconfidential\b", ignore_case=True, pin_model="gpt-4o"),
    Rule(name="acme", tenant="acme", max_tier="budget"),
)


def ruled() -> Profile:
    return profile(floor=0.5, rules=RULES, pinned_prices={"gpt-4o": (2.5, 10.0)})


def test_first_matching_pin_decides():
    d = run(ruled(), [[0.9, 0.9, 0.9]] * 2, [RequestContext(workflow="legal-review"), RequestContext(workflow="audit")])
    assert tiers_of(d) == ["frontier", "mid"]
    assert [c.reason for c in d.choices] == ["rule:legal", "rule:legal-2"]


def test_max_tier_rule_caps_and_says_so():
    d = run(ruled(), [[0.1, 0.2, 0.9], [0.1, 0.9, 0.9]], [RequestContext(stage="summarize")] * 2)
    assert tiers_of(d) == ["mid", "mid"]
    assert [c.reason for c in d.choices] == ["rule:summaries", "classifier"]


def test_min_tier_rule_on_prompt_length():
    d = run(ruled(), [[0.9, 0.9, 0.9]], tokens=6000)
    assert tiers_of(d) == ["mid"] and d.choices[0].reason == "rule:long"
    assert tiers_of(run(ruled(), [[0.9, 0.9, 0.9]], tokens=4999)) == ["budget"]


def test_regex_pin_to_a_model_outside_the_tiers():
    d = run(ruled(), [[0.9, 0.9, 0.9]], texts=["This is CONFIDENTIAL."], tokens=1000,
            pinned_quality={"gpt-4o": np.array([0.8], np.float32)})
    c = d.choices[0]
    assert (c.model, c.tier, c.tier_index, c.reason) == ("gpt-4o", "", -1, "rule:secret")
    assert c.confidence == pytest.approx(0.8)
    assert c.cost == pytest.approx((1000 * 2.5 + 1000 * 10.0) / 1e6)


def test_request_overrides():
    q = [[0.9, 0.9, 0.9]]
    d = run(ruled(), q, [RequestContext(min_tier=2)])
    assert tiers_of(d) == ["frontier"] and d.choices[0].reason == "override:min_tier"
    d = run(ruled(), [[0.1, 0.1, 0.9]], [RequestContext(max_tier=1)])
    assert tiers_of(d) == ["mid"] and d.choices[0].reason == "override:max_tier"
    d = run(ruled(), [[0.6, 0.7, 0.9]], [RequestContext(quality_floor=0.8)])
    assert tiers_of(d) == ["frontier"] and d.choices[0].reason == "override:quality_floor"
    # max_cost 0.008 USD leaves out the frontier (0.040): best remaining under the floor is the fallback mid
    d = run(ruled(), [[0.1, 0.2, 0.9]], [RequestContext(max_cost=0.008)])
    assert tiers_of(d) == ["mid"] and d.choices[0].reason == "override:max_cost"
    # nothing affordable: the cheapest open tier
    d = run(ruled(), [[0.1, 0.2, 0.9]], [RequestContext(max_cost=0.0001)])
    assert tiers_of(d) == ["budget"]


def test_when_a_minimum_and_a_maximum_contradict_the_maximum_wins():
    d = run(ruled(), [[0.9, 0.9, 0.9]], [RequestContext(tenant="acme", min_tier=2)])
    assert tiers_of(d) == ["budget"]


def test_pins_beat_request_bounds():
    d = run(ruled(), [[0.9, 0.9, 0.9]], [RequestContext(workflow="legal-review", max_tier=0)])
    assert tiers_of(d) == ["frontier"]


def test_escalation_goes_strictly_up_to_the_cheapest_clearing_tier():
    q = [[0.9, 0.9, 0.9], [0.9, 0.3, 0.9], [0.9, 0.3, 0.4]]
    d = run(ruled(), q, [RequestContext(escalate_from=0)] * 3)
    assert tiers_of(d) == ["mid", "frontier", "frontier"]
    assert {c.reason for c in d.choices} == {"escalation"}
    # a pin does not hold an escalation down
    d = run(ruled(), [[0.9, 0.9, 0.9]], [RequestContext(workflow="audit", escalate_from=1)])
    assert tiers_of(d) == ["frontier"]


def test_escalation_capped_by_a_rule_is_refused():
    d = run(ruled(), [[0.9, 0.9, 0.9]], [RequestContext(stage="summarize", escalate_from=1)])
    assert d.choices[0].refused and "rule:summaries" in d.choices[0].refused


def test_exploration_propensities():
    p = profile(floor=0.5, exploration_rate=0.3)
    n = 4000
    d = run(p, [[0.9, 0.9, 0.9]] * n, rng=np.random.default_rng(0))
    tiers = np.array(tiers_of(d))
    props = np.array([c.propensity for c in d.choices])
    # policy says budget: P(budget) = 0.7 + 0.1, P(mid) = P(frontier) = 0.1
    assert (tiers == "budget").mean() == pytest.approx(0.8, abs=0.03)
    assert set(np.round(props[tiers == "budget"], 6)) == {0.8}
    assert set(np.round(props[tiers != "budget"], 6)) == {0.1}
    assert {c.reason for c, t in zip(d.choices, tiers, strict=True) if t != "budget"} == {"exploration"}


# -- calibration ------------------------------------------------------------------------


def test_share_floors_hit_the_shares_on_the_calibration_rows():
    q = np.random.default_rng(1).random((1000, 3)).astype(np.float32)
    shares = [0.5, 0.3, 0.2]
    floors = S.share_floors(q, shares)
    idx, _ = S.choose_floor(q, floors, np.ones(q.shape, bool))
    assert S.tier_shares(idx, 3) == pytest.approx(shares, abs=0.002)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_top_share_floor_hits_the_share(share, seed):
    q = np.random.default_rng(seed).random((500, 3)).astype(np.float32)
    floor = S.top_share_floor(q, share)
    idx, _ = S.choose_floor(q, floor, np.ones(q.shape, bool))
    assert S.tier_shares(idx, 3)[-1] == pytest.approx(share, abs=1 / 500 + 1e-9)


def test_budget_lambda_meets_the_budget():
    rng = np.random.default_rng(2)
    q = np.sort(rng.random((2000, 3)), axis=1).astype(np.float32)
    cost = S.expected_cost(rng.integers(10, 2000, 2000), np.full(2000, 300), [1, 3, 10], [2, 4, 30])
    for budget in (2.0, 5.0, 8.0):
        lam = S.budget_lambda(q, cost, budget)
        idx = S.choose_budget(q, cost, lam, np.ones(q.shape, bool))
        spent = cost[np.arange(2000), idx].mean() * 1000
        assert spent <= budget + 1e-9
        looser = S.choose_budget(q, cost, lam * 0.9, np.ones(q.shape, bool))
        assert cost[np.arange(2000), looser].mean() * 1000 > spent * 0.999  # no slack left on the table
    with pytest.raises(S.UnreachableTarget, match="below the cheapest possible"):
        S.budget_lambda(q, cost, 0.01)


# -- cascade: which decisions a margin of error in the quality cannot move ------------------------

CASCADE_PROFILES = {
    "floor": profile(floor=0.5),
    "share": profile(mode="share", shares={"frontier": 0.2}, floors=(0.7, 0.55, 0.0)),
    "budget": profile(mode="budget", budget_per_1k=5, budget_lambda=0.02),
    "rework": profile(mode="rework", rework_cost=0.2),
    "capped": profile(floor=0.5, rules=(Rule(name="acme", tenant="acme", max_tier="mid"),)),
}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(CASCADE_PROFILES)),
    st.lists(st.floats(0.0, 1.0, width=32), min_size=3, max_size=3),
    st.floats(0.001, 0.3),
    st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3),
    st.booleans(),
)
def test_a_settled_decision_survives_any_error_within_the_margin(mode, q, margin, unit, acme):
    p = CASCADE_PROFILES[mode]
    ctx = [RequestContext(tenant="acme" if acme else "")]
    quality = np.array([q], np.float32)
    tokens, texts = np.full(1, 1000, np.int64), ["x"]
    settled = settled_within(margin, p, quality, tokens, texts, ctx)[0]
    moved = np.clip(quality + 0.999 * margin * np.array([unit], np.float32), 0.0, 1.0)
    before = decide(p, quality, tokens, texts, ctx).choices[0].tier
    after = decide(p, moved, tokens, texts, ctx).choices[0].tier
    if settled:
        assert after == before


@pytest.mark.parametrize("mode", sorted(CASCADE_PROFILES))
def test_a_decision_near_its_threshold_is_not_settled(mode):
    """Each mode's boundary, approached within the margin, is flagged close; far from it, settled.
    A shift of all tiers together would leave budget and rework decisions unmoved."""
    p = CASCADE_PROFILES[mode]
    tokens, texts, ctx = np.full(2, 1000, np.int64), ["x"] * 2, [RequestContext()] * 2
    near_far = {  # row 0: near a boundary, row 1: far from every boundary
        "floor": [[0.52, 0.6, 0.9], [0.95, 0.96, 0.97]],
        "share": [[0.71, 0.6, 0.9], [0.99, 0.99, 0.99]],
        "budget": [[0.5, 0.55, 0.9], [0.9, 0.1, 0.1]],  # costs 3/7/40 per 1k, lambda 0.02: 0.44, 0.41, 0.10
        "rework": [[0.6, 0.62, 0.8], [0.99, 0.5, 0.5]],  # USD 0.083, 0.083, 0.080: frontier by 0.003
        "capped": [[0.48, 0.6, 0.9], [0.9, 0.9, 0.9]],
    }[mode]
    q = np.array(near_far, np.float32)
    assert settled_within(0.05, p, q, tokens, texts, ctx).tolist() == [False, True]
    assert settled_within(0.001, p, q, tokens, texts, ctx).tolist() == [True, True]


def settled_by_deciding_twice(margin, p, quality, tokens, texts, contexts):
    """settled_within's definition, spelled out: decide, shake the qualities towards the worst
    case for the chosen tier, decide again, and compare the whole answers."""
    plain = decide(p, quality, tokens, texts, contexts).choices
    shaken = quality + np.float32(margin)
    for i, c in enumerate(plain):
        if c.tier_index >= 0:
            shaken[i, c.tier_index] -= np.float32(2 * margin)
    worst = decide(p, np.clip(shaken, 0.0, 1.0), tokens, texts, contexts).choices
    return [a.tier_index == b.tier_index and a.model == b.model and a.refused == b.refused
            for a, b in zip(plain, worst, strict=True)]


QUALITY = st.floats(0.0, 1.0, width=32) | st.floats(0.375, 0.625, width=32)  # often near a floor
REQUESTS = st.builds(
    RequestContext,
    workflow=st.sampled_from(["", "legal-review", "audit"]),
    stage=st.sampled_from(["", "", "summarize"]),
    tenant=st.sampled_from(["", "", "acme"]),
    min_tier=st.sampled_from([None, None, None, 0, 1, 2]),
    max_tier=st.sampled_from([None, None, None, 0, 1, 2]),
    quality_floor=st.none() | st.floats(0.3, 0.8),
    max_cost=st.sampled_from([None, None, None, 0.0001, 0.008, 0.05]),
    escalate_from=st.sampled_from([None, None, 0, 0, 1, 2]),
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(sorted(CASCADE_PROFILES)),
    st.lists(st.tuples(st.lists(QUALITY, min_size=3, max_size=3), REQUESTS,
                       st.sampled_from(["x", "This is CONFIDENTIAL."]), st.sampled_from([1000, 6000])),
             min_size=1, max_size=6),
    st.floats(0.0, 0.3),
    st.booleans(),
)
def test_settled_within_is_deciding_twice_without_the_work(mode, rows, margin, reuse):
    """settled_within reruns only the choosers on the bounds decide already made (from its own
    Decided, or made afresh); its answer is the definition's, rules, pins, overrides,
    escalation and refusals included."""
    p = CASCADE_PROFILES[mode].model_copy(update={"rules": RULES, "pinned_prices": {"gpt-4o": (2.5, 10.0)}})
    quality = np.array([r[0] for r in rows], np.float32)
    contexts, texts = [r[1] for r in rows], [r[2] for r in rows]
    tokens = np.array([r[3] for r in rows], np.int64)
    plain = decide(p, quality, tokens, texts, contexts) if reuse else None
    got = settled_within(margin, p, quality, tokens, texts, contexts, plain)
    assert got.tolist() == settled_by_deciding_twice(margin, p, quality, tokens, texts, contexts)
