import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from router.scoring import (
    choose_floor,
    most_capable_allowed,
    pair_calibration,
    sigmoid,
    tier_quality,
    win_rate,
)

ALL = np.ones((1, 3), bool)


def test_cheapest_tier_clearing_the_floor_wins():
    quality = np.array([[0.7, 0.8, 0.9], [0.5, 0.65, 0.9], [0.2, 0.3, 0.61]], np.float32)
    idx, cleared = choose_floor(quality, 0.6, np.ones(quality.shape, bool))
    assert idx.tolist() == [0, 1, 2] and cleared.all()


def test_no_tier_clears_floor_falls_back_to_most_capable_allowed():
    q = np.array([[0.1, 0.2, 0.3]], np.float32)
    idx, cleared = choose_floor(q, 0.5, ALL)
    assert idx.tolist() == [2] and not cleared[0]
    idx, _ = choose_floor(q, 0.5, np.array([[True, True, False]]))
    assert idx.tolist() == [1]
    assert most_capable_allowed(np.array([[True, False, False], [False, True, True]])).tolist() == [0, 2]


def test_floor_is_inclusive_and_extremes():
    q = np.array([[0.5, 0.9]], np.float32)
    allowed = np.ones((1, 2), bool)
    assert choose_floor(q, 0.5, allowed)[0][0] == 0
    assert choose_floor(q, 0.0, allowed)[0][0] == 0  # floor 0: always the cheapest
    assert not choose_floor(q, 1.0, allowed)[1][0]


def test_win_rate_of_cheapest_is_one_half_and_follows_bradley_terry():
    ability = np.array([[0.0, 1.0, -2.0]], np.float32)
    win = win_rate(ability, np.ones(3, np.float32), np.zeros(3, np.float32))
    np.testing.assert_allclose(win, [[0.5, sigmoid(np.array(1.0)), sigmoid(np.array(-2.0))]], rtol=1e-6)


def test_tier_quality_is_ability_minus_difficulty():
    q = tier_quality(np.array([[2.0, 0.0]], np.float32), np.array([2.0], np.float32))
    np.testing.assert_allclose(q, [[0.5, sigmoid(np.array(-2.0))]], rtol=1e-6)


def test_sigmoid_does_not_overflow():
    out = sigmoid(np.array([-1e6, 1e6], np.float32))
    assert np.isfinite(out).all() and out[0] < 1e-10 and out[1] > 1 - 1e-6


@given(
    arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 5)), elements=st.floats(0, 1, width=32)),
    st.floats(0, 1),
)
def test_decision_invariants(quality, threshold):
    idx, cleared = choose_floor(quality, threshold, np.ones(quality.shape, bool))
    for row, t, ok in zip(quality, idx, cleared, strict=True):
        cheaper = row[:t]
        assert (cheaper < np.float32(threshold)).all()  # never a more expensive tier than needed
        if ok:
            assert row[t] >= np.float32(threshold)
        else:
            assert t == len(row) - 1 and (row < threshold).all()


def test_win_temperature_softens_and_is_fitted_to_outcomes():
    from router.scoring import fit_temperature

    ability = np.array([[0.0, 2.0]], np.float32)
    scale, bias = pair_calibration(["cheap", "dear"], [], temperature=2.0)  # no fitted pair: 1/T
    assert win_rate(ability, scale, bias)[0, 1] == pytest.approx(float(sigmoid(np.array(1.0))))
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 3, 20000)
    outcome = (rng.random(20000) < 1 / (1 + np.exp(-diff / 3.0))).astype(float)  # true T = 3
    assert fit_temperature(diff, outcome) == pytest.approx(3.0, rel=0.1)


def test_platt_recovers_scale_and_bias():
    from router.scoring import fit_platt

    rng = np.random.default_rng(1)
    diff = rng.normal(0, 2, 40000)
    outcome = (rng.random(40000) < 1 / (1 + np.exp(-(0.5 * diff - 0.8)))).astype(float)
    scale, bias = fit_platt(diff, outcome)
    assert scale == pytest.approx(0.5, abs=0.03) and bias == pytest.approx(-0.8, abs=0.05)
    # separable data stays finite
    assert all(np.isfinite(fit_platt(np.array([-1.0, 1.0]), np.array([0.0, 1.0]))))


def test_pair_calibration_reads_either_orientation_and_falls_back_to_the_temperature():
    from types import SimpleNamespace

    pairs = [SimpleNamespace(first="big", second="small", scale=0.5, bias=0.3),
             SimpleNamespace(first="small", second="mid", scale=2.0, bias=-0.4)]
    scale, bias = pair_calibration(["small", "mid", "big", "other"], pairs, temperature=4.0)
    assert scale == pytest.approx([0.25, 2.0, 0.5, 0.25])
    assert bias == pytest.approx([0.0, 0.4, 0.3, 0.0])  # (small, mid) stored the other way round: bias flips
    ability = np.array([[1.0, 2.0, 3.0, 1.0]])
    win = win_rate(ability, scale, bias)
    assert win[0, 0] == 0.5
    assert win[0, 1] == pytest.approx(float(sigmoid(np.array(2.0 * 1.0 + 0.4))))
    assert win[0, 2] == pytest.approx(float(sigmoid(np.array(0.5 * 2.0 + 0.3))))
    assert win[0, 3] == pytest.approx(0.5)  # no fitted pair: sigmoid(0 / T)
    # consistency: P(mid beats small) computed from the stored (small, mid) pair is its complement
    s2, b2 = pair_calibration(["mid", "small"], pairs, temperature=4.0)
    assert float(sigmoid(np.array(s2[1] * (1.0 - 2.0) + b2[1]))) == pytest.approx(1 - win[0, 1])


def test_open_ended_win_mixes_two_calibrations_by_the_gate():
    from types import SimpleNamespace

    from router.scoring import closed_form, open_pair_calibration

    closed_pairs = [SimpleNamespace(first="cheap", second="dear", scale=0.5, bias=0.0),
                    SimpleNamespace(first="cheap", second="mid", scale=1.0, bias=0.1)]
    open_pairs = [SimpleNamespace(first="dear", second="cheap", scale=2.0, bias=1.0)]  # stored the other way round
    models = ["cheap", "mid", "dear"]
    closed_cal = pair_calibration(models, closed_pairs, temperature=1.0)
    open_cal = open_pair_calibration(models, closed_pairs, open_pairs, temperature=1.0)
    # a pair judged open-ended takes its open calibration there; the others keep the closed one
    assert open_cal[0] == pytest.approx([1.0, 1.0, 2.0]) and open_cal[1] == pytest.approx([0.0, -0.1, 1.0])
    ability = np.array([[0.0, 0.5, 1.0]] * 3, np.float32)
    gate = np.array([1.0, 0.0, 0.25], np.float32)
    win = win_rate(ability, *closed_cal, open_cal, gate)
    only_closed, only_open = win_rate(ability, *closed_cal), win_rate(ability, *open_cal)
    np.testing.assert_allclose(win[0], only_closed[0], rtol=1e-6)  # surely closed-form: as before
    np.testing.assert_allclose(win[1], only_open[1], rtol=1e-6)  # surely open-ended: the judged calibration
    np.testing.assert_allclose(win[2], 0.25 * only_closed[2] + 0.75 * only_open[2], rtol=1e-6)
    assert (win[:, 0] == 0.5).all()
    assert win[1, 2] == pytest.approx(float(sigmoid(np.array(2.0 * 1.0 + 1.0))))
    # the gate is a logistic regression on the embedding
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(closed_form(emb, np.array([2.0, -1.0], np.float32), 0.5),
                               sigmoid(np.array([2.5, -0.5])), rtol=1e-6)
