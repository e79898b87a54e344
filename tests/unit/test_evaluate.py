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


def test_floor_settled_is_the_servers_rule_on_a_two_tier_floor_profile():
    from router.policy import RequestContext, settled_within
    from router.profiles import Profile, Tier

    rng = np.random.default_rng(3)
    q = rng.random((400, 2)).astype(np.float32)
    tiers = (Tier(name="weak", model="w", price_input=1.0, price_output=1.0),
             Tier(name="strong", model="s", price_input=9.0, price_output=9.0))
    for floor, margin in ((0.5, 0.05), (0.7, 0.1), (0.3, 0.01)):
        p = Profile(name="p", tiers=tiers, floor=floor)
        served = settled_within(margin, p, q, np.full(len(q), 100, np.int64), ["x"] * len(q),
                                [RequestContext()] * len(q))
        assert (E.floor_settled(q[:, 0].astype(np.float64), floor, margin) == served).all()


def test_cascade_curve_spans_first_stage_alone_to_main_alone(pair):
    q_weak, q_strong = pair
    rng = np.random.default_rng(5)
    gain = q_strong - q_weak
    q_main = np.clip(0.6 - 0.3 * gain + 0.2 * rng.random(len(gain)), 0, 1)  # a good router's weak quality
    q_first = np.clip(q_main + 0.3 * rng.standard_normal(len(gain)), 0, 1)  # a noisier one
    main_alone = E.apgr(E.routed_quality(1 - q_main, q_weak, q_strong), q_weak, q_strong)
    first_alone = E.apgr(E.routed_quality(1 - q_first, q_weak, q_strong), q_weak, q_strong)
    apgrs, shares = {}, {}
    for m in (0.0, 0.05, 0.2, 9.0):
        curve, main_share = E.cascade_curve(1 - q_first, 1 - q_main, q_weak, q_strong, m)
        apgrs[m], shares[m] = E.apgr(curve, q_weak, q_strong), float(main_share.mean())
    assert apgrs[9.0] == pytest.approx(main_alone, abs=0.01) and shares[9.0] == 1.0
    assert apgrs[0.0] == pytest.approx(first_alone, abs=0.01) and shares[0.0] < 0.01
    assert first_alone < apgrs[0.05] < apgrs[0.2] <= apgrs[9.0] + 0.005
    assert shares[0.0] < shares[0.05] < shares[0.2] < shares[9.0]


def test_calibrated_ece_is_the_noise_of_a_calibrated_predictor():
    rng = np.random.default_rng(7)
    small, large = rng.uniform(0.3, 0.95, 134), rng.uniform(0.3, 0.95, 5000)
    bound = E.calibrated_ece(small)
    # outcomes drawn from the predictions themselves: about 95 % of such ECEs fall under the bound
    under = [E.expected_calibration_error(small, rng.random(134) < small) <= bound for _ in range(400)]
    assert 0.9 <= np.mean(under) <= 0.99
    assert E.calibrated_ece(large) < bound / 3  # noise shrinks with more outcomes
    assert E.expected_calibration_error(small, np.zeros(134)) > bound  # a real miscalibration is beyond it
    assert np.isnan(E.calibrated_ece([]))


def test_bootstrap_intervals_bracket_the_figure_and_order_the_routers(pair):
    q_weak, q_strong = pair
    rng = np.random.default_rng(7)
    oracle = q_strong - q_weak
    noisy = oracle + rng.normal(0.0, 1.0, len(oracle))  # a real but imperfect router
    scores = {"noisy": noisy, "random": rng.random(len(oracle)), "noisy_again": noisy.copy()}
    got = E.bootstrap_apgr(scores, q_weak, q_strong, ["noisy", "random"], draws=100, seed=3)
    point = E.router_figures(noisy, q_weak, q_strong)["apgr"]
    lo, mid, hi = got["apgr"]["noisy"]
    assert lo < point < hi and lo < mid < hi and 0 < hi - lo < 0.3
    assert got["apgr"]["random"][2] < lo  # one fixed random order: its interval lies below the router's
    assert got["noisy_minus"]["random"][0] > 0  # the router beats random in every resample's 2.5 %
    assert got["noisy_minus"]["noisy_again"] == [0.0, 0.0, 0.0]  # a router against itself: no difference
    assert got["random_minus"]["noisy"][2] < 0  # and the other way round
    assert E.bootstrap_apgr(scores, q_weak, q_strong, ["noisy", "random"], draws=100, seed=3) == got  # seeded


def test_bootstrap_without_a_gap_in_any_resample_says_nothing():
    same = np.ones(50)
    assert E.bootstrap_apgr({"a": np.arange(50.0)}, same, same, ["a"], draws=10) == {}
