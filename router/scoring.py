"""Decision math shared by serving and training: head logits -> tier probabilities -> decision."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# Reason codes carried in RouteResponse.reason.
REASON_CLASSIFIER = "classifier"  # the cheapest tier whose quality clears the floor
REASON_FALLBACK = "fallback"  # no tier clears the floor: fail safe to the most capable tier


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


def calculate_strong_win_rate(ability: FloatArray, temperature: float = 1.0) -> FloatArray:
    """Bradley-Terry P(tier t's answer beats the cheapest tier's): sigmoid((s_t - s_0) / T).

    ability: (B, T) logits of the profile's tiers, cheap to expensive. Column 0 is 0.5.
    temperature: fitted by training so the probability is calibrated against pairwise outcomes
    (a tie counts one half); 1.0 is plain Bradley-Terry.
    """
    return sigmoid((ability - ability[:, :1]) / temperature)


def fit_temperature(diff: npt.ArrayLike, outcome: npt.ArrayLike) -> float:
    """The T minimizing log loss of sigmoid(diff / T) against outcomes in [0, 1] (grid search:
    deterministic, and one dimension needs nothing cleverer)."""
    d = np.asarray(diff, np.float64)
    y = np.asarray(outcome, np.float64)
    grid = np.geomspace(0.25, 50.0, 400)
    p = np.clip(1.0 / (1.0 + np.exp(-d[None, :] / grid[:, None])), 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)
    return float(grid[int(np.argmin(loss))])


@dataclass(frozen=True, slots=True)
class Decisions:
    """Per-request decisions for one batch of one profile."""

    tier_index: npt.NDArray[np.int64]  # (B,) index into the profile's tiers
    confidence: FloatArray  # (B,) quality of the chosen tier
    reason: list[str]  # (B,) reason codes


def cheapest_clearing_floor(quality: FloatArray, threshold: float) -> Decisions:
    """Pick the cheapest tier whose quality >= threshold; if none does, the last (most capable).

    quality: (B, T), tiers ordered cheap to expensive.
    """
    if quality.ndim != 2 or quality.shape[1] == 0:
        raise ValueError(f"quality must be (batch, tiers) with tiers >= 1, got {quality.shape}")
    clears = quality >= threshold  # (B, T)
    any_clears = clears.any(axis=1)
    last = quality.shape[1] - 1
    idx = np.where(any_clears, clears.argmax(axis=1), last).astype(np.int64)
    confidence = quality[np.arange(len(idx)), idx]
    reason: list[str] = np.where(any_clears, REASON_CLASSIFIER, REASON_FALLBACK).tolist()
    return Decisions(tier_index=idx, confidence=confidence, reason=reason)
