"""Decision math shared by serving and training: head logits -> tier probabilities -> decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# Reason codes carried in RouteResponse.reason.
REASON_CLASSIFIER = "classifier"  # the cheapest tier whose quality clears the floor
REASON_FALLBACK = "fallback"  # no tier clears the floor: fail safe to the most capable tier
REASON_ESCALATION = "escalation"  # a previous attempt failed: the cheapest tier above it
REASON_EXPLORATION = "exploration"  # the profile's exploration sent this request to a random open tier
RULE_PREFIX = "rule:"  # rule:<name>, a profile rule pinned or capped the tier
OVERRIDE_PREFIX = "override:"  # override:<field>, a per-request override moved it


# Prompt-length features appended to the embedding at the head's input: f = (log(1 + chars) - C) * S
# and f^2 / 2. Length carries across domains (MMLU subjects never seen in training); head.onnx
# computes the same from its `prompt_chars` input, and export checks that they agree.
LENGTH_CENTER = 5.7  # log(1 + 300): a typical prompt
LENGTH_SCALE = 3.0  # large enough that the ridge penalty leaves room for the feature
LENGTH_FEATURES = ("log_chars", "log_chars_sq")


def length_features(chars: npt.ArrayLike) -> FloatArray:
    """(N, 2) length features from prompt lengths in characters."""
    f = (np.log1p(np.asarray(chars, np.float64)) - LENGTH_CENTER) * LENGTH_SCALE
    return np.stack([f, 0.5 * f * f], axis=1).astype(np.float32)


def sigmoid(x: npt.NDArray[np.floating]) -> FloatArray:
    # Clip so exp() never overflows for extreme logits.
    return (1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))).astype(np.float32)


def tier_quality(ability: FloatArray, difficulty: FloatArray) -> FloatArray:
    """P(acceptable answer) per model: sigmoid(ability - difficulty).

    ability: (B, M) per-prompt model logits; difficulty: (B,) the prompt's bar.
    """
    return sigmoid(ability - difficulty[:, None])


def win_rate(
    ability: FloatArray,
    scale: FloatArray,
    bias: FloatArray,
    open_calibration: tuple[FloatArray, FloatArray] | None = None,
    closed: FloatArray | None = None,
) -> FloatArray:
    """Bradley-Terry P(tier t's answer beats the cheapest tier's) = sigmoid(scale_t (s_t - s_0) + bias_t).

    ability: (B, T) logits of the profile's tiers, cheap to expensive. scale, bias: (T,) per
    tier, from the model's per-pair calibration (pair_calibration), fitted by training so the
    probability is calibrated against pairwise outcomes (a tie counts one half); 1/T and 0
    where a pair had too few shared outcomes to fit its own (1 and 0: plain Bradley-Terry).
    Column 0 is 0.5.

    With `open_calibration` (scale, bias per tier, fitted on open-ended requests judged against
    each other) and `closed` (B,), each row's P(closed-form question) from closed_form(), the
    answer mixes the two: closed x the closed-form calibration + (1 - closed) x the open one.
    Right and wrong answers tie far more often than judged answers do, so one calibration
    cannot fit both kinds of request (docs/evaluation.md, "Win probability on open-ended requests")."""
    diff = ability - ability[:, :1]
    win = sigmoid(scale * diff + bias)
    if open_calibration is not None and closed is not None:
        c = closed.astype(np.float32)[:, None]
        win = c * win + (1.0 - c) * sigmoid(open_calibration[0] * diff + open_calibration[1])
    win[:, 0] = 0.5
    return win


def closed_form(embedding: FloatArray, weight: FloatArray, bias: float) -> FloatArray:
    """P(the request is a closed-form question, graded right or wrong, rather than an open-ended
    one judged against another answer): a logistic gate on the prompt's embedding (B, dim),
    fitted by training on which kind of data set each training prompt came from."""
    return sigmoid(embedding @ weight + np.float32(bias))


def pair_calibration(
    models: Sequence[str], pairs: Sequence[WinPairLike], temperature: float
) -> tuple[FloatArray, FloatArray]:
    """(scale, bias) per tier for win_rate: tier t against tier 0, read from the fitted pairs
    (stored one way round: P(first beats second) = sigmoid(scale (s_first - s_second) + bias))."""
    scale = np.full(len(models), 1.0 / temperature, np.float32)
    bias = np.zeros(len(models), np.float32)
    fitted = {(p.first, p.second): (p.scale, p.bias) for p in pairs}
    for t, m in enumerate(models[1:], start=1):
        if (m, models[0]) in fitted:
            scale[t], bias[t] = fitted[(m, models[0])]
        elif (models[0], m) in fitted:
            sc, b = fitted[(models[0], m)]
            scale[t], bias[t] = sc, -b  # 1 - sigmoid(sc (s_0 - s_t) + b) = sigmoid(sc (s_t - s_0) - b)
    return scale, bias


def open_pair_calibration(
    models: Sequence[str], pairs: Sequence[WinPairLike], open_pairs: Sequence[WinPairLike], temperature: float
) -> tuple[FloatArray, FloatArray]:
    """pair_calibration on open-ended requests: a pair fitted there (open_pairs) takes that
    calibration, any other keeps its closed-form one (pairs), either way round."""
    merged = {frozenset((p.first, p.second)): p for p in pairs}
    merged |= {frozenset((p.first, p.second)): p for p in open_pairs}
    return pair_calibration(models, list(merged.values()), temperature)


class GateLike(Protocol):
    @property
    def weight(self) -> Sequence[float]: ...

    @property
    def bias(self) -> float: ...


@dataclass(frozen=True, slots=True)
class WinCalibration:
    """One head's win calibration for an ordered list of models (tiers, cheap to expensive):
    per model (scale, bias) against the first; with a gate, also the open-ended calibration and
    the gate's (weight, bias). What both the server and training's figures serve (win_rate)."""

    closed: tuple[FloatArray, FloatArray]
    open: tuple[FloatArray, FloatArray] | None = None
    gate: tuple[FloatArray, float] | None = None

    @classmethod
    def of(
        cls,
        models: Sequence[str],
        pairs: Sequence[WinPairLike],
        open_pairs: Sequence[WinPairLike],
        temperature: float,
        gate: GateLike | None = None,
    ) -> WinCalibration:
        closed = pair_calibration(models, pairs, temperature)
        if gate is None:
            return cls(closed)
        return cls(
            closed,
            open_pair_calibration(models, pairs, open_pairs, temperature),
            (np.asarray(gate.weight, np.float32), float(gate.bias)),
        )

    def closed_share(self, embedding: FloatArray) -> FloatArray | None:
        """Each row's P(closed-form) from its embedding (B, dim); None without a gate."""
        return None if self.gate is None else closed_form(embedding, *self.gate)

    def win(self, ability: FloatArray, closed: FloatArray | None = None) -> FloatArray:
        """win_rate over `ability` (B, models); `closed` (closed_share) mixes in the open-ended calibration."""
        if self.open is None or closed is None:
            return win_rate(ability, *self.closed)
        return win_rate(ability, *self.closed, self.open, closed)


def fit_platt(diff: npt.ArrayLike, outcome: npt.ArrayLike, ridge: float = 1e-3) -> tuple[float, float]:
    """(scale, bias) minimizing log loss of sigmoid(scale diff + bias) against outcomes in [0, 1]
    (Newton's method on two parameters, a little ridge so it stays finite on separable data)."""
    d = np.asarray(diff, np.float64)
    y = np.asarray(outcome, np.float64)
    Z = np.stack([d, np.ones_like(d)], axis=1)
    w = np.array([1.0, 0.0])
    for _ in range(50):
        p = sigmoid(Z @ w)
        grad = Z.T @ (p - y) / len(d) + ridge * w
        hess = (Z * (p * (1 - p))[:, None]).T @ Z / len(d) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(w[0]), float(w[1])


class WinPairLike(Protocol):
    first: str
    second: str
    scale: float
    bias: float


def fit_temperature(diff: npt.ArrayLike, outcome: npt.ArrayLike) -> float:
    """The T minimizing log loss of sigmoid(diff / T) against outcomes in [0, 1] (grid search:
    deterministic, and one dimension needs nothing cleverer)."""
    d = np.asarray(diff, np.float64)
    y = np.asarray(outcome, np.float64)
    grid = np.geomspace(0.25, 50.0, 400)
    p = np.clip(1.0 / (1.0 + np.exp(-d[None, :] / grid[:, None])), 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)
    return float(grid[int(np.argmin(loss))])


# -- the four ways a profile states its trade-off --------------------------------------
#
# Each takes quality (B, T) (tiers cheap to expensive) and `allowed` (B, T), the tiers that
# rules, overrides and escalation leave open (every row has at least one), and returns the
# chosen tier index per row (B,). Ties go to the cheaper tier. Calibration (training and
# `python -m training calibrate`) uses the same functions, so what it measures is what serves.

MODES = ("floor", "share", "budget", "rework")
USD_PER_MILLION = 1e6


def expected_cost(
    input_tokens: npt.ArrayLike, output_tokens: npt.ArrayLike, price_input: npt.ArrayLike, price_output: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """(B, T) USD per request: tokens (B,) times prices (T,) in USD per million tokens."""
    tin = np.asarray(input_tokens, np.float64)[:, None]
    tout = np.asarray(output_tokens, np.float64)[:, None]
    return (tin * np.asarray(price_input, np.float64) + tout * np.asarray(price_output, np.float64)) / USD_PER_MILLION


def most_capable_allowed(allowed: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    last = allowed.shape[1] - 1
    return (last - allowed[:, ::-1].argmax(axis=1)).astype(np.int64)


def choose_floor(
    quality: FloatArray, floors: npt.ArrayLike, allowed: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """(a) Quality floor, and (b) target shares once calibrated into per-tier floors: the cheapest
    allowed tier whose quality clears its floor; where none does, the most capable allowed tier.
    floors: a scalar, (T,) or (B, T). Returns (tier index, whether a tier cleared its floor)."""
    clears = (quality >= np.asarray(floors, np.float32)) & allowed
    cleared: npt.NDArray[np.bool_] = np.asarray(clears.any(axis=1))
    idx = np.where(cleared, clears.argmax(axis=1), most_capable_allowed(allowed)).astype(np.int64)
    return idx, cleared


def choose_budget(
    quality: FloatArray, cost: npt.NDArray[np.float64], lam: float, allowed: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    """(c) Budget: maximize quality - lam * cost (cost in USD per 1,000 requests). `lam`, the
    price of quality, is calibrated so the mean cost on the deployment's traffic meets the budget
    (budget_lambda): for a budget, this spends the money where it buys the most quality."""
    utility = np.where(allowed, quality.astype(np.float64) - lam * 1000.0 * cost, -np.inf)
    return utility.argmax(axis=1).astype(np.int64)


def choose_rework(
    quality: FloatArray, cost: npt.NDArray[np.float64], rework_cost: float, allowed: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    """(d) Rework cost: minimize the expected total cost, price + P(failure) x rework cost (USD),
    where P(failure) = 1 - quality. Under-provisioning is priced, so no threshold is needed."""
    total = np.where(allowed, cost + (1.0 - quality.astype(np.float64)) * rework_cost, np.inf)
    return total.argmin(axis=1).astype(np.int64)


def tier_shares(tier_index: npt.ArrayLike, n_tiers: int) -> npt.NDArray[np.float64]:
    idx = np.asarray(tier_index, np.int64)
    return np.bincount(idx, minlength=n_tiers).astype(np.float64) / max(len(idx), 1)


# -- calibration: targets -> the parameters the choosers above take ---------------------


class UnreachableTarget(ValueError):
    """A target that no setting can meet on the given traffic; the message says why."""


def _between(sorted_desc: npt.NDArray[np.float32], m: int) -> float:
    """A floor that lets exactly the m largest values through (midway between neighbours)."""
    if m <= 0:
        return float("inf")
    if m >= len(sorted_desc):
        return 0.0
    return float((sorted_desc[m - 1] + sorted_desc[m]) / 2.0)


def share_floors(quality: FloatArray, shares: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Per-tier floors that give each tier its target share of `quality`'s rows under
    choose_floor (all tiers allowed). shares: (T,) summing to 1. Tier 0 takes the rows where it
    is best placed (its highest quality), tier 1 the best of the rest, and so on; the last tier
    takes what is left, so its floor is 0."""
    s = np.asarray(shares, np.float64)
    n, t = quality.shape
    if s.shape != (t,) or (s < 0).any() or abs(s.sum() - 1.0) > 1e-6:
        raise UnreachableTarget(f"shares must be {t} non-negative fractions summing to 1, got {s.tolist()}")
    if n == 0:
        raise UnreachableTarget("no prompts to calibrate on")
    floors = np.zeros(t, np.float64)
    remaining = np.ones(n, bool)
    for k in range(t - 1):
        want = int(round(s[k] * n))
        q = np.sort(quality[remaining, k])[::-1]
        floors[k] = _between(q, min(want, len(q)))
        remaining &= ~(quality[:, k] >= floors[k])
    return floors


def top_share_floor(quality: FloatArray, top_share: float) -> float:
    """One common floor under which the most capable tier gets `top_share` of the rows: it
    answers where no cheaper tier clears the floor, i.e. where max over cheaper tiers < floor."""
    if not 0.0 <= top_share <= 1.0:
        raise UnreachableTarget(f"share must be in [0, 1], got {top_share}")
    if quality.shape[1] < 2:
        raise UnreachableTarget("a one-tier profile has no share to set")
    best_cheaper = np.sort(quality[:, :-1].max(axis=1))[::-1]
    # rows through to a cheaper tier: the (1 - share) * n with the highest best_cheaper
    return min(_between(best_cheaper, int(round((1.0 - top_share) * len(best_cheaper)))), 1.0)


def budget_lambda(quality: FloatArray, cost: npt.NDArray[np.float64], budget_per_1k: float) -> float:
    """The smallest price of quality (see choose_budget) whose mean cost per 1,000 requests on
    these rows is within the budget. Mean cost falls as lam grows; bisection in log space."""
    allowed = np.ones(quality.shape, bool)

    def spend(lam: float) -> float:
        idx = choose_budget(quality, cost, lam, allowed)
        return float(cost[np.arange(len(idx)), idx].mean() * 1000.0)

    floor_spend = float(cost.min(axis=1).mean() * 1000.0)
    if budget_per_1k < floor_spend:
        raise UnreachableTarget(
            f"budget {budget_per_1k:.4g} USD per 1,000 requests is below the cheapest possible "
            f"{floor_spend:.4g} on this traffic"
        )
    if spend(0.0) <= budget_per_1k:
        return 0.0
    lo, hi = 1e-9, 1.0
    while spend(hi) > budget_per_1k:
        hi *= 10.0
        if hi > 1e12:
            raise UnreachableTarget(f"budget {budget_per_1k:.4g} cannot be met on this traffic")
    for _ in range(100):
        mid = float(np.sqrt(lo * hi))
        if spend(mid) > budget_per_1k:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return hi
