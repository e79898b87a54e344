"""The head's identification: fitted on judged-vs-reference outcomes alone, its absolute
abilities are measured from the reference, not left where the optimizer stopped. Needs the train extra."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from training.model import Terms, WinRateHead  # noqa: E402

N, DIM, MODELS, REF = 300, 12, 4, 1


def synthetic(compare: tuple[str, ...]) -> tuple[np.ndarray, Terms]:
    """Every model judged against model REF on every prompt (data set 0), plus, when
    `compare` has a second data set, every model graded for correctness (data set 1)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, DIM)).astype(np.float32)
    true = X @ rng.normal(size=(DIM, MODELS)) + rng.normal(size=MODELS)
    rows, models, sets, targets = [], [], [], []
    for d, kind in enumerate(compare):
        for m in range(MODELS):
            if kind == "reference" and m == REF:
                continue
            against = true[:, REF] if kind == "reference" else X[:, 0]
            p = 1 / (1 + np.exp(-(true[:, m] - against)))
            rows.append(np.arange(N))
            models.append(np.full(N, m))
            sets.append(np.full(N, d))
            targets.append((rng.random(N) < p).astype(np.float32))
    terms = Terms(np.concatenate(rows), np.concatenate(models), np.concatenate(sets), np.concatenate(targets),
                  compare, REF, MODELS)
    return X, terms


def fitted(X: np.ndarray, terms: Terms, seed: int) -> WinRateHead:
    return WinRateHead(rank=4, hidden=8, steps=100, seed=seed, lexical_l2=None).fit(X, terms)


def test_reference_only_outcomes_pin_the_reference_and_the_bar_at_zero():
    X, terms = synthetic(("reference",))
    heads = [fitted(X, terms, seed) for seed in (0, 1)]
    for head in heads:
        ability, difficulty = head.logits(X)
        assert head.anchored_
        assert np.all(ability[:, REF] == 0.0) and np.all(difficulty == 0.0)
        # the margins over the reference are still learned: each outcome's predicted probability
        # ranks the outcomes as a fitted head should (AUC well above 0.5)
        p = head.term_probability(X, terms)
        won, lost = p[terms.target == 1], p[terms.target == 0]
        assert (won[:, None] > lost[None, :]).mean() > 0.75


def test_a_correctness_data_set_leaves_the_reference_free():
    X, terms = synthetic(("reference", "bar"))
    head = fitted(X, terms, 0)
    ability, difficulty = head.logits(X)
    assert not head.anchored_
    assert np.abs(ability[:, REF]).max() > 0.1 and np.abs(difficulty).max() > 0.1
