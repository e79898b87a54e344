"""The open-ended win calibration's cross-fitting: which head scores which judged prompt."""

from __future__ import annotations

import numpy as np

from tests.conftest import require_data
from training import data as D
from training.fit import crossfit_ability, prompt_kinds


def test_each_judged_prompt_is_scored_by_a_head_that_did_not_train_on_it():
    data = D.load(["mmlu", "alpaca_eval", "alpaca_eval_binary"], require_data(), limit=60)
    rows = np.nonzero(D.folds(data.prompts, 10) != 0)[0]  # a training split, as in training.fit
    X = np.zeros((data.n_rows, 386), np.float32)
    held_out: list[set[int]] = []

    class Scored:  # stands in for a refitted head: every row it scores gets its number
        def __init__(self, number: int) -> None:
            self.number = number

        def logits(self, x, tokens=None):  # type: ignore[no-untyped-def]
            return np.full((len(x), len(data.models)), float(self.number), np.float32), None

    def refit(held):  # type: ignore[no-untyped-def]
        held_out.append(set(held.tolist()))
        return Scored(len(held_out))

    scores = crossfit_ability(data, X, rows, None, refit)
    judged = set(rows[prompt_kinds(data)[rows] == 0].tolist())
    assert len(held_out) == 2 and held_out[0] | held_out[1] == judged and not held_out[0] & held_out[1]
    assert all(len(h) > 0.25 * len(judged) for h in held_out)  # a real split, not one side
    for number, held in enumerate(held_out, start=1):
        assert (scores[sorted(held)] == number).all()  # scored by the head fitted without them
    others = np.setdiff1d(np.arange(data.n_rows), sorted(judged))
    assert (scores[others] == 0).all()  # graded (MMLU) and held-out rows are not scored
    # a prompt in both AlpacaEval files is held out of the same inner head both times
    side = {}
    for number, held in enumerate(held_out):
        for r in held:
            assert side.setdefault(data.prompts[r], number) == number
