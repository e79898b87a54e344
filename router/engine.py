"""RoutingEngine.route_batch: queries -> decisions, synchronously (tokenize, encode, head, decide).

A profile with `cascade_margin`, on a model version that has a cascade stage (manifest `cascade`),
is answered in two steps: the cheap first stage (the static encoder and its own head) decides
every request, and the main encoder runs again only on the requests whose decision is close:
those whose tier would change if the chosen tier's quality were `cascade_margin` lower and every
other tier's that much higher (the worst case within the margin, whatever the profile's mode).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from router.artifacts import ArtifactError, LoadedModel, Stage
from router.policy import Choice, Decided, RequestContext, decide, settled_within
from router.profiles import Profile
from router.scoring import WinCalibration, tier_quality
from router.tokenizer import Keep

log = logging.getLogger(__name__)

Lexical = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]  # router.lexical.Lexicon.features
PAD_RATIO = 1.3  # longest / shortest prompt in one encoder run


def run_head(
    session: ort.InferenceSession,
    embedding: npt.NDArray[np.float32],
    prompt_chars: npt.NDArray[np.float32],
    lexical: Lexical | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A head.onnx forward: ability (B, M) and difficulty (B,); `lexical` for a head that reads words."""
    feeds: dict[str, np.ndarray] = {
        "embedding": np.ascontiguousarray(embedding, np.float32),
        "prompt_chars": np.asarray(prompt_chars, np.float32),
    }
    if lexical is not None:
        feeds["lex_index"], feeds["lex_value"] = lexical
    ability, difficulty = session.run(["ability", "difficulty"], feeds)
    return ability, difficulty


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
    encoder: str = ""  # name of the encoder whose embedding decided (a cascade's first stage or the main one)
    cascade: str = ""  # profiles with a cascade: "first" (the first stage was sure) or "main" (a close call)

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
        self.main = model.main_stage
        self.first = model.first_stage
        self._rng = np.random.default_rng()  # exploration draws (profiles with exploration_rate > 0)
        self._win_params: dict[tuple[int, tuple[str, ...]], WinCalibration] = {}
        self._warned: set[str] = set()

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

    def win_params(
        self, profile: Profile, stage: Stage | None = None
    ) -> WinCalibration:
        """Per-tier (scale, bias) of the win probability against the profile's cheapest tier."""
        stage = stage or self.main
        key = (0 if stage is self.main else 1, tuple(profile.models))
        if key not in self._win_params:
            head = stage.head_spec
            self._win_params[key] = WinCalibration.of(
                key[1], head.win_pairs, head.open_win_pairs, head.win_temperature, head.gate
            )
        return self._win_params[key]

    def embed(
        self, texts: Sequence[str], keep: Sequence[Keep] | None = None, stage: Stage | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64], Lexical | None]:
        """Embeddings (B, dim), token counts after truncation (B,) and of the whole text (B,),
        and the head's lexical features from the same tokens (None if it reads none);
        the embeddings in sub-batches of similar length so
        padding stays small and no forward pass exceeds max_batch_tokens.

        A sub-batch ends where the next prompt is more than PAD_RATIO times longer than its
        shortest: encoder cost grows with padded tokens, and an extra ORT run costs about as
        much as two tokens, so splitting is nearly free (see docs/benchmarks.md)."""
        stage = stage or self.main
        enc_in, enc_out = stage.encoder_spec.input_names, stage.encoder_spec.output_name
        enc = stage.tokenizer.encode(texts, keep)
        order = np.argsort(enc.lengths, kind="stable")
        out = np.empty((len(texts), stage.encoder_spec.dim), np.float32)
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
                enc_in[0]: enc.input_ids[rows, :width],
                enc_in[1]: enc.attention_mask[rows, :width],
            }
            out[rows] = stage.encoder.run([enc_out], feeds)[0]
            start = stop
        lexical = stage.lexicon.features(enc.input_ids, enc.lengths) if stage.lexicon is not None else None
        return out, enc.lengths, enc.full_lengths, lexical

    def lexical(
        self, texts: Sequence[str], keep: Sequence[Keep] | None = None, stage: Stage | None = None
    ) -> Lexical | None:
        """The head's lexical features alone (for callers that cached the embeddings)."""
        stage = stage or self.main
        if stage.lexicon is None:
            return None
        tokens = stage.tokenizer.tokens(texts, keep)
        return stage.lexicon.features(tokens.input_ids, tokens.lengths)

    def score(
        self,
        embedding: npt.NDArray[np.float32],
        prompt_chars: npt.NDArray[np.float32],
        stage: Stage | None = None,
        lexical: Lexical | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Head forward: per-model ability logits (B, M) and the prompt's difficulty (B,)."""
        stage = stage or self.main
        if stage.lexicon is not None and lexical is None:
            raise ValueError(f"the head of {self.version} reads lexical features: pass them (embed, lexical)")
        return run_head(stage.head, embedding, prompt_chars, lexical)

    def _cascades(self, profile: Profile) -> bool:
        if profile.cascade_margin is None:
            return False
        if self.first is None:
            if profile.name not in self._warned:
                self._warned.add(profile.name)
                log.warning(
                    "profile %r asks for a cascade but model %s has no cascade stage: its main encoder answers",
                    profile.name, self.version,
                )
            return False
        return True

    def route_batch(self, queries: Sequence[RouteQuery]) -> list[RouteResult]:
        if not queries:
            return []
        results: list[RouteResult | None] = [None] * len(queries)
        cascades = [self._cascades(q.profile) for q in queries]
        first = [i for i, c in enumerate(cascades) if c]
        main = [i for i, c in enumerate(cascades) if not c]
        close: list[int] = []
        if first:
            assert self.first is not None
            close = self._run(self.first, queries, first, results)
            main = sorted(main + close)
        if main:
            self._run(self.main, queries, main, results)
        for i in close:
            results[i] = dataclasses.replace(results[i], cascade="main")  # type: ignore[type-var]
        assert all(r is not None for r in results), "every query belongs to one profile group. This is a bug."
        return results  # type: ignore[return-value]

    def _run(
        self, stage: Stage, queries: Sequence[RouteQuery], idx: list[int], results: list[RouteResult | None]
    ) -> list[int]:
        """Decide queries[idx] with `stage` into `results`. In the cascade's first stage, the
        rows whose decision is close are left undecided and returned (the main stage takes them)."""
        cascade = stage is not self.main
        batch = [queries[i] for i in idx]
        embedding, n_tokens, input_tokens, lexical = self.embed([q.text for q in batch], [q.keep for q in batch], stage)
        chars = np.fromiter((len(q.text) for q in batch), np.float32, len(batch))
        ability, difficulty = self.score(embedding, chars, stage, lexical)
        close: list[int] = []
        # One vectorized decision per profile present in the batch.
        by_profile: dict[int, list[int]] = {}
        for i, q in enumerate(batch):
            by_profile.setdefault(id(q.profile), []).append(i)
        for rows in by_profile.values():
            profile = batch[rows[0]].profile
            cols = self.columns(profile)
            sub_ability = ability[rows][:, cols]  # (b, T)
            quality = tier_quality(sub_ability, difficulty[rows])
            texts = [batch[r].text for r in rows]
            contexts = [batch[r].context for r in rows]
            pinned = {
                m: tier_quality(ability[rows][:, [self._column[m]]], difficulty[rows])[:, 0]
                for m in profile.pinned_prices if m in self._column
            }
            tokens = input_tokens[rows]
            decided = None
            if cascade:
                margin = float(profile.cascade_margin or 0.0)
                if profile.exploration_rate == 0:  # then the final decision is the unexplored one: make it once
                    decided = decide(profile, quality, tokens, texts, contexts, pinned, self._rng)
                settled = settled_within(margin, profile, quality, tokens, texts, contexts, decided)
                if not settled.all():  # the close ones go on to the main stage
                    close.extend(idx[rows[j]] for j in np.flatnonzero(~settled))
                    sel = np.flatnonzero(settled)
                    rows = [rows[j] for j in sel]
                    quality, sub_ability, tokens = quality[sel], sub_ability[sel], tokens[sel]
                    texts, contexts = [texts[j] for j in sel], [contexts[j] for j in sel]
                    pinned = {m: q[sel] for m, q in pinned.items()}
                    if decided is not None:
                        decided = Decided([decided.choices[j] for j in sel], decided.costs[sel],
                                          decided.output_tokens[sel])
                    if not rows:
                        continue
            if decided is None:
                decided = decide(profile, quality, tokens, texts, contexts, pinned, self._rng)
            calibration = self.win_params(profile, stage)
            win = calibration.win(sub_ability, calibration.closed_share(embedding[rows]))
            for j, row in enumerate(rows):
                results[idx[row]] = RouteResult(
                    choice=decided.choices[j],
                    quality=tuple(quality[j].tolist()),
                    win_probability=tuple(win[j].tolist()),
                    costs=tuple(decided.costs[j].tolist()),
                    model_version=self.version,
                    n_tokens=int(n_tokens[row]),
                    input_tokens=int(input_tokens[row]),
                    output_tokens=int(decided.output_tokens[j]),
                    embedding=embedding[row],
                    encoder=stage.encoder_spec.name,
                    cascade="first" if cascade else "",
                )
        return close
