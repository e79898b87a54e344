import numpy as np
import pytest

from training import evaluate as E


@pytest.fixture
def pair():
    rng = np.random.default_rng(1)
    n = 4000
    q_strong = (rng.random(n) < 0.8).astype(float)
    q_weak = (rng.random(n) < 0.65).astype(float)
    return q_weak, q_strong


def test_random_router_apgr_is_one_half(pair):
    q_weak, q_strong = pair
    apgrs = [
        E.router_figures(np.random.default_rng(100 + s).random(len(q_weak)), q_weak, q_strong)["apgr"] for s in range(5)
    ]
    assert abs(np.mean(apgrs) - 0.5) < 0.02


def test_oracle_beats_random_and_reaches_full_gap_early(pair):
    q_weak, q_strong = pair
    oracle = E.router_figures(q_strong - q_weak, q_weak, q_strong)
    assert oracle["apgr"] > 0.85
    assert oracle["cpt50"] < 0.2 and oracle["cpt80"] < 0.3


def test_curve_endpoints_are_weak_and_strong(pair):
    q_weak, q_strong = pair
    curve = E.routed_quality(np.zeros(len(q_weak)), q_weak, q_strong)
    assert curve[0] == pytest.approx(q_weak.mean())
    assert curve[-1] == pytest.approx(q_strong.mean())


def test_auc_and_losses():
    assert E.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert E.auc([0.5, 0.5], [0, 1]) == 0.5
    assert E.log_loss([0.5], [1]) == pytest.approx(np.log(2))
    assert E.expected_calibration_error([0.2] * 10, [0] * 8 + [1] * 2) == pytest.approx(0.0)
    assert E.expected_calibration_error([0.9] * 10, [0] * 10) == pytest.approx(0.9)
