"""RoutingEngine.route_batch: queries -> decisions, synchronously (tokenize, encode, head, decide)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from router.artifacts import ArtifactError, LoadedModel
from router.policy import Choice, RequestContext, decide
from router.profiles import Profile
from router.scoring import pair_calibration, tier_quality, win_rate
from router.tokenizer import Keep

PAD_RATIO = 1.3  # longest / shortest prompt in one encoder run


@dataclass(frozen=True, slots=True)
class RouteQuery:
    """One request as the engine sees it: text to embed, and the profile that decides."""

    text: str
    profile: Profile
    keep: Keep = "head"  # which end survives truncation (see router.tokenizer)
    context: RequestContext = RequestContext()


@dataclass(frozen=True, slots=True)
class RouteResult:
    choice: Choice
    quality: tuple[float, ...]  # per tier of the profile, cheap to expensive
    win_probability: tuple[float, ...]  # per tier: P(beats the cheapest tier)
    costs: tuple[float, ...]  # per tier: expected USD
    model_version: str
    n_tokens: int  # encoder tokens after truncation, specials included
    input_tokens: int  # word pieces of the whole prompt (for costs)
    output_tokens: int
    embedding: npt.NDArray[np.float32]  # (dim,), for the decision log

    @property
    def frontier_cost(self) -> float:
        return self.costs[-1]


class RoutingEngine:
    """Runs one loaded model version over batches of queries. Not thread-safe by design:
    the batcher is its only caller and runs one batch at a time."""

    def __init__(self, model: LoadedModel, *, max_batch_tokens: int = 8192) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self._column = {name: i for i, name in enumerate(model.models)}
        self._enc_in = model.manifest.encoder.input_names
        self._enc_out = model.manifest.encoder.output_name
        self._rng = np.random.default_rng()  # exploration draws (profiles with exploration_rate > 0)
        self._win_params: dict[tuple[str, ...], tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {}

    @property
    def version(self) -> str:
        return self.model.version

    def columns(self, profile: Profile) -> npt.NDArray[np.int64]:
        try:
            return np.array([self._column[m] for m in profile.models], np.int64)
        except KeyError as e:
            raise ArtifactError(
                f"profile {profile.name!r} names model {e.args[0]!r}, unknown to model {self.version}"
            ) from None

    def win_params(self, profile: Profile) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Per-tier (scale, bias) of the win probability against the profile's cheapest tier."""
        key = tuple(profile.models)
        if key not in self._win_params:
            head = self.model.manifest.head
            self._win_params[key] = pair_calibration(key, head.win_pairs, head.win_temperature)
        return self._win_params[key]

    def embed(
        self, texts: Sequence[str], keep: Sequence[Keep] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Embeddings (B, dim), token counts after truncation (B,) and of the whole text (B,),
        in sub-batches of similar length so
        padding stays small and no forward pass exceeds max_batch_tokens.

        A sub-batch ends where the next prompt is more than PAD_RATIO times longer than its
        shortest: encoder cost grows with padded tokens, and an extra ORT run costs about as
        much as two tokens, so splitting is nearly free (see docs/benchmarks.md)."""
        enc = self.model.tokenizer.encode(texts, keep)
        order = np.argsort(enc.lengths, kind="stable")
        out = np.empty((len(texts), self.model.manifest.encoder.dim), np.float32)
        start = 0
        while start < len(order):
            # Grow the chunk while (rows x longest row) fits the token budget.
            stop = start + 1
            shortest = enc.lengths[order[start]]
            while (
                stop < len(order)
                and (stop - start + 1) * enc.lengths[order[stop]] <= self.max_batch_tokens
                and enc.lengths[order[stop]] <= PAD_RATIO * shortest
            ):
                stop += 1
            rows = order[start:stop]
            width = int(enc.lengths[rows].max())
            feeds = {
                self._enc_in[0]: enc.input_ids[rows, :width],
                self._enc_in[1]: enc.attention_mask[rows, :width],
            }
            out[rows] = self.model.encoder.run([self._enc_out], feeds)[0]
            start = stop
        return out, enc.lengths, enc.full_lengths

    def score(
        self, embedding: npt.NDArray[np.float32], prompt_chars: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Head forward: per-model ability logits (B, M) and the prompt's difficulty (B,)."""
        ability, difficulty = self.model.head.run(
            ["ability", "difficulty"], {"embedding": embedding, "prompt_chars": prompt_chars}
        )
        return ability, difficulty

    def route_batch(self, queries: Sequence[RouteQuery]) -> list[RouteResult]:
        if not queries:
            return []
        embedding, n_tokens, input_tokens = self.embed([q.text for q in queries], [q.keep for q in queries])
        chars = np.fromiter((len(q.text) for q in queries), np.float32, len(queries))
        ability, difficulty = self.score(embedding, chars)
        results: list[RouteResult | None] = [None] * len(queries)
        # One vectorized decision per profile present in the batch.
        by_profile: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            by_profile.setdefault(id(q.profile), []).append(i)
        for rows in by_profile.values():
            profile = queries[rows[0]].profile
            cols = self.columns(profile)
            sub_ability = ability[rows][:, cols]  # (b, T)
            quality = tier_quality(sub_ability, difficulty[rows])
            win = win_rate(sub_ability, *self.win_params(profile))
            pinned = {
                m: tier_quality(ability[rows][:, [self._column[m]]], difficulty[rows])[:, 0]
                for m in profile.pinned_prices if m in self._column
            }
            decided = decide(
                profile, quality, input_tokens[rows], [queries[r].text for r in rows],
                [queries[r].context for r in rows], pinned, self._rng,
            )
            for j, row in enumerate(rows):
                results[row] = RouteResult(
                    choice=decided.choices[j],
                    quality=tuple(quality[j].tolist()),
                    win_probability=tuple(win[j].tolist()),
                    costs=tuple(decided.costs[j].tolist()),
                    model_version=self.version,
                    n_tokens=int(n_tokens[row]),
                    input_tokens=int(input_tokens[row]),
                    output_tokens=int(decided.output_tokens[j]),
                    embedding=embedding[row],
                )
        assert all(r is not None for r in results), "every query belongs to one profile group. This is a bug."
        return results  # type: ignore[return-value]
