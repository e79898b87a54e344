"""Routing quality with RouteLLM's definitions: APGR, CPT(50/80), calibration, beside baselines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F = npt.NDArray[np.float64]
SHARES = np.linspace(0.0, 1.0, 101)  # share of calls sent to the strong model


def routed_quality(
    score: npt.ArrayLike, q_weak: npt.ArrayLike, q_strong: npt.ArrayLike, shares: F = SHARES, seed: int = 0
) -> F:
    """Mean quality when the top-`share` prompts by `score` go to strong, the rest to weak.

    Ties in score are broken at random (seeded), so a constant score is the random router.
    """
    score, q_weak, q_strong = (np.asarray(a, np.float64) for a in (score, q_weak, q_strong))
    n = len(score)
    tiebreak = np.random.default_rng(seed).random(n)
    order = np.lexsort((tiebreak, -score))  # descending score
    gain = np.concatenate([[0.0], np.cumsum((q_strong - q_weak)[order])])  # (n+1,)
    k = np.rint(shares * n).astype(np.int64)
    return (q_weak.sum() + gain[k]) / n


def pgr(curve: F, q_weak: npt.ArrayLike, q_strong: npt.ArrayLike) -> F:
    """Performance gap recovered at each share: 0 = weak alone, 1 = strong alone."""
    lo, hi = float(np.mean(np.asarray(q_weak, np.float64))), float(np.mean(np.asarray(q_strong, np.float64)))
    return (curve - lo) / (hi - lo)


def apgr(curve: F, q_weak: npt.ArrayLike, q_strong: npt.ArrayLike, shares: F = SHARES) -> float:
    """Average PGR over strong-call shares 0..100 % (area under the PGR curve)."""
    return float(np.trapezoid(pgr(curve, q_weak, q_strong), shares))


def cpt(curve: F, q_weak: npt.ArrayLike, q_strong: npt.ArrayLike, target: float, shares: F = SHARES) -> float:
    """Smallest share of strong calls that recovers `target` of the performance gap."""
    ok = np.nonzero(pgr(curve, q_weak, q_strong) >= target - 1e-12)[0]
    return float(shares[ok[0]]) if len(ok) else float("nan")


def router_figures(score: npt.ArrayLike, q_weak: npt.ArrayLike, q_strong: npt.ArrayLike) -> dict[str, float]:
    curve = routed_quality(score, q_weak, q_strong)
    return {
        "apgr": apgr(curve, q_weak, q_strong),
        "cpt50": cpt(curve, q_weak, q_strong, 0.5),
        "cpt80": cpt(curve, q_weak, q_strong, 0.8),
    }


def bootstrap_apgr(
    scores: dict[str, npt.ArrayLike],
    q_weak: npt.ArrayLike,
    q_strong: npt.ArrayLike,
    references: Sequence[str],
    draws: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """How much the APGR figures owe to which prompts were scored: each router's APGR, and the
    paired difference of each of `references` minus every other router, over `draws` resamples of
    the prompts with replacement (the same resample for every router). Returns 2.5 / 50 / 97.5 %
    quantiles under "apgr" and "<reference>_minus". This is the test set's sampling noise only:
    the heads are not refitted."""
    qw, qs = np.asarray(q_weak, np.float64), np.asarray(q_strong, np.float64)
    sc = {name: np.asarray(v, np.float64) for name, v in scores.items()}
    rng = np.random.default_rng(seed)
    got: dict[str, list[float]] = {name: [] for name in sc}
    for _ in range(draws):
        idx = rng.integers(0, len(qw), len(qw))
        if np.isclose(qw[idx].mean(), qs[idx].mean()):
            continue  # no gap to recover in this resample
        for name, v in sc.items():
            got[name].append(apgr(routed_quality(v[idx], qw[idx], qs[idx]), qw[idx], qs[idx]))

    def q(x: npt.ArrayLike) -> list[float]:
        return [float(v) for v in np.quantile(np.asarray(x, np.float64), [0.025, 0.5, 0.975])]

    if not any(got.values()):
        return {}  # no resample had a gap: nothing to say
    out = {"apgr": {name: q(v) for name, v in got.items()}}
    for ref in references:
        out[f"{ref}_minus"] = {
            name: q(np.asarray(got[ref]) - np.asarray(v)) for name, v in got.items() if name != ref
        }
    return out


def random_curve(q_weak: npt.ArrayLike, q_strong: npt.ArrayLike, draws: int = 50, seed: int = 0) -> F:
    """The random router's expected curve: the mean over `draws` seeded random orders
    (its APGR converges to 0.5; one draw on 800 prompts can land at 0.46 or 0.53)."""
    n = len(np.asarray(q_weak))
    rng = np.random.default_rng(seed)
    return np.mean([routed_quality(rng.random(n), q_weak, q_strong) for _ in range(draws)], axis=0)


def baseline_scores(
    q_weak: npt.ArrayLike, q_strong: npt.ArrayLike, lengths: npt.ArrayLike, seed: int = 0
) -> dict[str, F]:
    """Scores of the reference routers: random, prompt length (longer goes strong), oracle."""
    return {
        "random": np.random.default_rng(seed).random(len(np.asarray(q_weak))),
        "prompt_length": np.asarray(lengths, np.float64),
        "oracle": np.asarray(q_strong, np.float64) - np.asarray(q_weak, np.float64),
    }


def expected_calibration_error(prob: npt.ArrayLike, outcome: npt.ArrayLike, bins: int = 10) -> float:
    """ECE with equal-width bins; soft outcomes (judge probabilities) are allowed."""
    prob, outcome = np.asarray(prob, np.float64), np.asarray(outcome, np.float64)
    idx = np.minimum((prob * bins).astype(np.int64), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            err += sel.mean() * abs(prob[sel].mean() - outcome[sel].mean())
    return float(err)


def calibrated_ece(prob: npt.ArrayLike, quantile: float = 0.95, draws: int = 400, bins: int = 10,
                   seed: int = 0) -> float:
    """The `quantile` of the ECE a perfectly calibrated predictor shows on these predictions, with
    outcomes drawn from them: how large an ECE sampling noise alone makes on as many outcomes."""
    prob = np.asarray(prob, np.float64)
    if not len(prob):
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = np.minimum((prob * bins).astype(np.int64), bins - 1)
    sum_p = np.bincount(idx, prob, minlength=bins)
    y = (rng.random((draws, len(prob))) < prob).astype(np.float64)
    sum_y = np.stack([np.bincount(idx, row, minlength=bins) for row in y])
    ece = np.abs(sum_p - sum_y).sum(axis=1) / len(prob)  # = expected_calibration_error of each draw
    return float(np.quantile(ece, quantile))


def log_loss(prob: npt.ArrayLike, outcome: npt.ArrayLike) -> float:
    p = np.clip(np.asarray(prob, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(outcome, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(score: npt.ArrayLike, label: npt.ArrayLike) -> float:
    """ROC AUC by the rank formula (ties averaged); labels are thresholded at 0.5."""
    s = np.asarray(score, np.float64)
    y = np.asarray(label, np.float64) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(prob: npt.ArrayLike, outcome: npt.ArrayLike) -> float:
    return float(np.mean((np.asarray(prob, np.float64) - np.asarray(outcome, np.float64)) ** 2))


def knn_gain(X_train: npt.NDArray[np.float32], gain_train: F, X_test: npt.NDArray[np.float32], k: int = 50) -> F:
    """k-nearest-neighbour router: mean strong-minus-weak outcome of the k most similar
    training prompts (cosine on the same normalized embeddings the head sees)."""
    out = np.empty(len(X_test), np.float64)
    for start in range(0, len(X_test), 1024):
        sims = X_test[start : start + 1024] @ X_train.T  # (b, n_train)
        top = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        out[start : start + 1024] = gain_train[top].mean(axis=1)
    return out


def quality_at_threshold(p_weak: F, q_weak: F, q_strong: F, threshold: float) -> dict[str, float]:
    """Serving's floor rule on a strong/weak pair: strong when the weak tier's quality is below."""
    strong = p_weak < threshold
    return {
        "threshold": threshold,
        "strong_share": float(strong.mean()),
        "quality": float(np.where(strong, q_strong, q_weak).mean()),
        "pgr": float(pgr(np.array([np.where(strong, q_strong, q_weak).mean()]), q_weak, q_strong)[0]),
    }


def plot_curves(curves: dict[str, F], q_weak: F, q_strong: F, title: str, path: str) -> None:
    """Cost-quality curve: routed quality against the share of strong calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"random": ":", "prompt_length": "--", "knn": "-.", "oracle": (0, (1, 1))}
    for name, curve in curves.items():
        ax.plot(
            SHARES * 100, curve, linestyle=styles.get(name, "-"), label=name, lw=2 if name.startswith("router") else 1.2
        )
    ax.axhline(float(np.mean(q_strong)), color="grey", lw=0.6)
    ax.axhline(float(np.mean(q_weak)), color="grey", lw=0.6)
    ax.set_xlabel("calls sent to the strong model (%)")
    ax.set_ylabel("routed quality")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def floor_settled(q_first: F, threshold: float, margin: float) -> npt.NDArray[np.bool_]:
    """For a two-tier floor profile: where the first stage's weak-tier quality decides on its own,
    as router.policy.settled_within has it (weak stays weak at q - margin, strong stays strong at
    q + margin)."""
    return (q_first - margin >= threshold) | (q_first + margin < threshold)


def cascade_curve(
    s_first: F, s_main: F, q_weak: F, q_strong: F, band: float, thresholds: F | None = None
) -> tuple[F, F]:
    """Routed quality at SHARES of a two-stage router, and the share of calls its main stage
    runs on, both interpolated from a sweep of the threshold t. A call goes strong when the
    deciding stage's score is above t; the first stage decides where its score is more than
    `band` from t. For the served floor rule the score is 1 - the weak tier's quality and the
    band is the profile's cascade_margin (floor_settled); for a decision on the gain of the
    strong tier (modes budget and rework), the score is that gain and the band twice the margin,
    since the chosen tier loses the margin and the other gains it (router.policy.settled_within)."""
    s_first, s_main, q_weak, q_strong = (np.asarray(a, np.float64) for a in (s_first, s_main, q_weak, q_strong))
    if thresholds is None:
        both = np.concatenate([s_first, s_main])
        lo, hi = float(both.min()), float(both.max())
        thresholds = np.unique(np.concatenate([np.quantile(both, np.linspace(0, 1, 801)), [lo - 1.0, hi + 1.0]]))
    share, quality, main = [], [], []
    for t in thresholds:
        sure = (s_first + band <= t) | (s_first - band > t)
        strong = np.where(sure, s_first > t, s_main > t)
        share.append(strong.mean())
        quality.append(np.where(strong, q_strong, q_weak).mean())
        main.append(1.0 - sure.mean())
    order = np.argsort(share, kind="stable")
    xs, qs, ms = (np.asarray(v)[order] for v in (share, quality, main))
    return np.interp(SHARES, xs, qs), np.interp(SHARES, xs, ms)
