"""From per-tier quality to one decision per request: rules, overrides, escalation, the profile's mode.

Precedence, first to last (docs/profiles.md):
1. Escalation: a request that says a tier failed gets the cheapest tier above it that clears the
   floor (the request's, else the profile's); never the same or a lower tier. Rule and request
   maximums still hold: when they leave no tier above, the request is refused.
2. Pins: the first rule in file order whose conditions match and that pins a tier or a model decides.
3. Bounds: every matching rule's min_tier / max_tier and the request's min_tier / max_tier narrow
   the tiers open to the mode (when a minimum and a maximum contradict, the maximum wins); the
   request's max_cost then leaves out tiers expected to cost more (if it leaves none, the cheapest
   open tier answers).
4. The profile's mode (router.scoring) chooses among the open tiers; a request's quality_floor
   replaces the mode by a floor. Exploration, when the profile has a rate, then sends that share
   of requests to a uniformly drawn open tier, and the propensity says how likely the answer was.

The reason names what decided: "rule:<name>", "override:<field>", "escalation", "exploration",
"classifier" or "fallback" (router.scoring).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from router import scoring as S
from router.profiles import Profile, Rule


class EscalationRefused(ValueError):
    """An escalation that cannot be answered: no tier above, or the profile's cap reached."""


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What rules match on, and the request's overrides (tier names already resolved to indices)."""

    workflow: str = ""
    stage: str = ""
    tenant: str = ""
    min_tier: int | None = None
    max_tier: int | None = None
    quality_floor: float | None = None
    max_cost: float | None = None
    output_tokens: int | None = None
    escalate_from: int | None = None  # index of the tier whose answer failed


@dataclass(frozen=True, slots=True)
class Choice:
    tier: str
    model: str
    tier_index: int  # -1: a pinned model outside the profile's tiers
    confidence: float  # quality of the chosen tier (0.0 for a pinned model the router model does not know)
    reason: str
    cost: float  # expected USD of the chosen tier
    propensity: float  # probability this answer was given (1.0 without exploration)
    refused: str = ""  # set when the request cannot be answered (router.policy.EscalationRefused)


@dataclass(frozen=True, slots=True)
class Decided:
    choices: list[Choice]
    costs: npt.NDArray[np.float64]  # (B, T) expected USD per tier
    output_tokens: npt.NDArray[np.int64]  # (B,)
    bounds: Bounds | None = None  # what the choices were made within (settled_within reuses it)


@dataclass
class _Row:
    allowed: npt.NDArray[np.bool_]
    lo_src: str = ""
    hi_src: str = ""
    pin: Rule | None = None
    cost_src: str = ""
    refused: str = ""
    notes: list[str] = field(default_factory=list)


_patterns: dict[tuple[str, bool], re.Pattern[str]] = {}


def _pattern(rule: Rule) -> re.Pattern[str] | None:
    if rule.pattern is None:
        return None
    key = (rule.pattern, rule.ignore_case)
    if key not in _patterns:
        _patterns[key] = rule.compiled()  # type: ignore[assignment]
    return _patterns[key]


def _bounds(profile: Profile, ctx: RequestContext, tokens: int, text: str, costs: npt.NDArray[np.float64]) -> _Row:
    t = len(profile.tiers)
    lo, hi = 0, t - 1
    row = _Row(allowed=np.zeros(t, bool))
    for rule in profile.rules:
        if not rule.matches(ctx.workflow, ctx.stage, ctx.tenant, tokens, text, _pattern(rule)):
            continue
        action, value = rule.action
        if action in ("pin_tier", "pin_model"):
            row.pin = row.pin or rule
        elif action == "min_tier" and (i := profile.tier_index(value)) > lo:
            lo, row.lo_src = i, S.RULE_PREFIX + rule.name
        elif action == "max_tier" and (i := profile.tier_index(value)) < hi:
            hi, row.hi_src = i, S.RULE_PREFIX + rule.name
    if ctx.min_tier is not None and ctx.min_tier > lo:
        lo, row.lo_src = ctx.min_tier, S.OVERRIDE_PREFIX + "min_tier"
    if ctx.max_tier is not None and ctx.max_tier < hi:
        hi, row.hi_src = ctx.max_tier, S.OVERRIDE_PREFIX + "max_tier"
    lo = min(lo, hi)
    row.allowed[lo : hi + 1] = True
    if ctx.escalate_from is not None:
        row.allowed[: ctx.escalate_from + 1] = False
        if not row.allowed.any():
            failed = profile.tiers[ctx.escalate_from].name
            row.refused = (
                f"escalation.failed_tier: no tier above {failed!r} is open"
                + (f" (capped by {row.hi_src})" if hi <= ctx.escalate_from and row.hi_src else "")
            )
            return row
    if ctx.max_cost is not None:
        affordable = row.allowed & (costs <= ctx.max_cost)
        if not affordable.all() or not row.allowed.all():
            row.cost_src = S.OVERRIDE_PREFIX + "max_cost"
        if affordable.any():
            row.allowed = affordable
        else:  # nothing fits the budget: the cheapest open tier
            cheapest = int(np.flatnonzero(row.allowed)[0])
            row.allowed = np.zeros(t, bool)
            row.allowed[cheapest] = True
    return row


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a batch's decisions depend on besides the quality: expected costs, per row the tiers
    that rules, overrides and escalation leave open, and the rows a floor decides (bounds();
    decide and settled_within share one)."""

    rows: list[_Row]
    allowed: npt.NDArray[np.bool_]  # (B, T); a refused row has every tier (so the choosers stay total)
    costs: npt.NDArray[np.float64]  # (B, T) expected USD per tier
    output_tokens: npt.NDArray[np.int64]  # (B,)
    by_floor: npt.NDArray[np.bool_]  # (B,) rows a floor decides (the request's quality_floor, or escalation)
    floors: npt.NDArray[np.float32] | None  # (B, 1) that floor (else the profile's); None: no such row


def bounds(
    profile: Profile, input_tokens: npt.NDArray[np.int64], texts: Sequence[str], contexts: Sequence[RequestContext]
) -> Bounds:
    t = len(profile.tiers)
    out_tokens = np.array(
        [c.output_tokens if c.output_tokens is not None else profile.expected_output_tokens for c in contexts],
        np.int64,
    )
    price_in, price_out = profile.prices
    costs = S.expected_cost(input_tokens, out_tokens, price_in, price_out)
    rows = [_bounds(profile, c, int(n), s, costs[i]) for i, (c, n, s) in enumerate(zip(contexts, input_tokens, texts,
                                                                                          strict=True))]
    for r in rows:
        if r.refused:
            r.allowed = np.ones(t, bool)  # placeholder so the vectorized choosers stay total
    allowed = np.stack([r.allowed for r in rows]) if rows else np.zeros((0, t), bool)
    by_floor = np.array([c.quality_floor is not None or c.escalate_from is not None for c in contexts], np.bool_)
    floors = None
    if by_floor.any():
        floors = np.array(
            [c.quality_floor if c.quality_floor is not None else profile.floor for c in contexts], np.float32
        )[:, None]
    return Bounds(rows, allowed, costs, out_tokens, by_floor, floors)


def _mode(
    profile: Profile, quality: S.FloatArray, b: Bounds, open_: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """The profile's mode among the open tiers: (tier per row, whether a tier cleared its floor)."""
    if profile.mode == "floor":
        return S.choose_floor(quality, profile.floor, open_)
    if profile.mode == "share":
        return S.choose_floor(quality, np.asarray(profile.floors), open_)
    ones = np.ones(len(quality), bool)
    if profile.mode == "budget":
        return S.choose_budget(quality, b.costs, float(profile.budget_lambda or 0.0), open_), ones
    return S.choose_rework(quality, b.costs, float(profile.rework_cost or 0.0), open_), ones


def _chosen(profile: Profile, quality: S.FloatArray, b: Bounds) -> npt.NDArray[np.int64]:
    """The tier decide gives each row that is neither refused nor pinned, before exploration."""
    idx = _mode(profile, quality, b, b.allowed)[0]
    if b.floors is not None:
        idx = np.where(b.by_floor, S.choose_floor(quality, b.floors, b.allowed)[0], idx)
    return idx


def decide(
    profile: Profile,
    quality: S.FloatArray,
    input_tokens: npt.NDArray[np.int64],
    texts: Sequence[str],
    contexts: Sequence[RequestContext],
    pinned_quality: dict[str, S.FloatArray] | None = None,
    rng: np.random.Generator | None = None,
) -> Decided:
    """Decisions for one profile's rows of a batch. quality: (B, T) per tier of the profile;
    pinned_quality: model -> (B,) quality for pin_model models the router model knows."""
    b, t = quality.shape
    bnd = bounds(profile, input_tokens, texts, contexts)
    rows, allowed, costs, out_tokens = bnd.rows, bnd.allowed, bnd.costs, bnd.output_tokens

    # the profile's mode, with and without the bounds (to say whether a bound moved the answer)
    idx, cleared = _mode(profile, quality, bnd, allowed)
    # the unbounded choice only matters where a bound narrowed the open tiers (to name it)
    free = _mode(profile, quality, bnd, np.ones((b, t), bool))[0] if not allowed.all() else idx
    by_floor, by_floor_cleared = idx, cleared
    if bnd.floors is not None:
        by_floor, by_floor_cleared = S.choose_floor(quality, bnd.floors, allowed)
    explore: npt.NDArray[np.bool_] = np.zeros(b, bool)
    if profile.exploration_rate > 0 and rng is not None:
        explore = np.asarray(rng.random(b) < profile.exploration_rate)

    choices: list[Choice] = []
    for i, (r, c) in enumerate(zip(rows, contexts, strict=True)):
        if r.refused:
            choices.append(Choice("", "", -1, 0.0, S.REASON_ESCALATION, 0.0, 0.0, refused=r.refused))
            continue
        propensity = 1.0
        if c.escalate_from is not None:
            k, reason = int(by_floor[i]), S.REASON_ESCALATION
        elif r.pin is not None:
            choices.append(_pinned(profile, r.pin, i, quality, costs, input_tokens, out_tokens, pinned_quality))
            continue
        else:
            if c.quality_floor is not None:
                k = int(by_floor[i])
                reason = S.OVERRIDE_PREFIX + "quality_floor" if by_floor_cleared[i] else S.REASON_FALLBACK
            else:
                k = int(idx[i])
                reason = S.REASON_CLASSIFIER if cleared[i] else S.REASON_FALLBACK
            if k != int(free[i]) and c.quality_floor is None:
                f = int(free[i])
                reason = (r.hi_src if f > k and r.hi_src else r.lo_src if f < k and r.lo_src else r.cost_src) or reason
            open_ = np.flatnonzero(r.allowed)
            if explore[i] and len(open_) > 1:
                share = profile.exploration_rate / len(open_)
                k_explored = int(open_[rng.integers(len(open_))]) if rng is not None else k
                propensity = share + (1.0 - profile.exploration_rate) * (k_explored == k)
                if k_explored != k:
                    reason = S.REASON_EXPLORATION
                k = k_explored
            elif profile.exploration_rate > 0 and len(open_) > 1:
                propensity = 1.0 - profile.exploration_rate + profile.exploration_rate / len(open_)
        tier = profile.tiers[k]
        choices.append(Choice(tier.name, tier.model, k, float(quality[i, k]), reason, float(costs[i, k]), propensity))
    return Decided(choices, costs, out_tokens, bnd)


def settled_within(
    margin: float,
    profile: Profile,
    quality: S.FloatArray,
    input_tokens: npt.NDArray[np.int64],
    texts: Sequence[str],
    contexts: Sequence[RequestContext],
    plain: Decided | None = None,
) -> npt.NDArray[np.bool_]:
    """Rows whose decision no change of each tier's quality by up to `margin` can move: the tier
    stays when the chosen tier's quality drops by `margin` and every other tier's rises by it.
    That is the worst case in every mode (floor and share: the chosen tier may fall under its floor
    and a cheaper one clear it; budget and rework: the best objective may lose to another), so a
    shift of all tiers together, which leaves budget and rework decisions alone, is not used.
    Refused and pinned rows are settled: no quality moves them. Exploration is left out: the
    caller draws it on the final decision. `plain`: decide's answer for these rows, when the
    caller has it (its bounds are reused; only the choosers run again)."""
    b = plain.bounds if plain is not None and plain.bounds is not None else bounds(
        profile, input_tokens, texts, contexts)
    chosen = _chosen(profile, quality, b)
    shaken = np.asarray(quality, np.float32) + np.float32(margin)
    shaken[np.arange(len(chosen)), chosen] -= np.float32(2 * margin)
    fixed = np.array([bool(r.refused) or (r.pin is not None and c.escalate_from is None)
                      for r, c in zip(b.rows, contexts, strict=True)], np.bool_)
    return fixed | (_chosen(profile, np.clip(shaken, 0.0, 1.0), b) == chosen)


def _pinned(
    profile: Profile, rule: Rule, i: int, quality: S.FloatArray, costs: npt.NDArray[np.float64],
    input_tokens: npt.NDArray[np.int64], out_tokens: npt.NDArray[np.int64],
    pinned_quality: dict[str, S.FloatArray] | None,
) -> Choice:
    reason = S.RULE_PREFIX + rule.name
    if rule.pin_tier is not None:
        k = profile.tier_index(rule.pin_tier)
        tier = profile.tiers[k]
        return Choice(tier.name, tier.model, k, float(quality[i, k]), reason, float(costs[i, k]), 1.0)
    model = rule.pin_model or ""
    for k, tier in enumerate(profile.tiers):  # a pinned model that is also a tier answers as that tier
        if tier.model == model:
            return Choice(tier.name, model, k, float(quality[i, k]), reason, float(costs[i, k]), 1.0)
    pin, pout = profile.pinned_prices[model]
    cost = float(S.expected_cost(input_tokens[i : i + 1], out_tokens[i : i + 1], [pin], [pout])[0, 0])
    q = pinned_quality.get(model) if pinned_quality else None
    return Choice("", model, -1, float(q[i]) if q is not None else 0.0, reason, cost, 1.0)
