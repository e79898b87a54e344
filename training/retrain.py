"""`python -m training retrain --from-log URL`: fit a candidate head on logged outcomes plus the base
data, compare it with the live model on the newest logged outcomes, and promote it only if it does
not regress.

A logged outcome says how the chosen model did on one prompt: exactly the head's correctness term
sigmoid(ability_m(x) - difficulty(x)) for that model (training.model), so it joins the base data's
terms with weight `log_weight`, under the base data's correctness ("bar") data set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router.artifacts import MANIFEST, LoadedModel, Stage, load_model, read_manifest, resolve_model_dir
from router.decisionlog import DecisionLog, LabeledDecisions, decisions
from router.engine import run_head
from router.lexical import Lexicon, Tokens
from router.policy import RequestContext, decide
from router.profiles import Profile, ProfileError, load_profiles
from router.scoring import LENGTH_CENTER, LENGTH_SCALE, length_features, sigmoid, tier_quality
from router.tokenizer import RouterTokenizer
from training import evaluate as E
from training import fit as F
from training.model import HEAD_FIELDS, Terms, WinRateHead

log = logging.getLogger(__name__)
SEEN_COSINE = 0.98  # a base prompt and a logged one of the same length this close are the same prompt

# -- the promotion gate ------------------------------------------------------------------
LOG_LOSS_SLACK = 0.002  # candidate log loss on held-out logged outcomes <= live + this
ECE_SLACK = 0.01  # candidate ECE <= max(live ECE + this, ECE_CEILING)
ECE_CEILING = 0.05
APGR_SLACK = 0.01  # base-data APGR >= live - this
APGR_PATH = ("mmlu_routing", "router_floor", "apgr")  # serving's floor rule, MMLU strong/weak pair, held-out fold
GATE_RULE = (
    f"promote iff, on the held-out (newest) logged outcomes, log loss <= live + {LOG_LOSS_SLACK} and "
    f"ECE <= max(live ECE + {ECE_SLACK}, {ECE_CEILING}, the 95th percentile of the ECE a calibrated head shows on as "
    "many outcomes); and, on the base data's held-out fold, "
    f"APGR (MMLU strong/weak pair, quality-floor rule) >= live - {APGR_SLACK} (skipped without MMLU); "
    "a refitted cascade first stage passes the same log checks on the held-out decisions it made"
)

Logits = Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class RetrainConfig(F.FitConfig):
    """FitConfig (the base data, the head, where versions go) plus where outcomes come from."""

    from_log: str = ""  # the decision log: an SQLAlchemy URL, or an SQLite file path
    live_dir: str = ""  # the live model: a version or a models root ("": models_dir, its DEFAULT)
    holdout_frac: float = 0.2  # the newest share of logged outcomes, held out to compare candidate and live
    min_outcomes: int = 200  # with fewer logged outcomes, nothing is fitted
    log_weight: float = 1.0  # weight of one logged outcome relative to one base-data correctness term
    ips_floor: float = 0.5  # off-policy estimate: the stand-in rule's floor, for decisions of unknown profiles
    profiles_path: str = str(F.REPO / "config" / "profiles.toml")  # profiles the off-policy estimate decides with
    dry_run: bool = False  # fit and compare only: no version written, nothing tracked

    def fit_config(self) -> F.FitConfig:
        return F.FitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(F.FitConfig)})


def log_url(value: str) -> str:
    """An SQLAlchemy URL as given; a plain path is an SQLite file."""
    return value if "://" in value else f"sqlite:///{Path(value).resolve()}"


def redact(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


# -- logged outcomes -> rows and terms -------------------------------------------------------


def time_split(n: int, holdout_frac: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(train, held-out) positions of n rows sorted oldest first: the newest share is held out."""
    n_hold = min(n - 1, max(1, int(round(n * holdout_frac))))
    return np.arange(n - n_hold), np.arange(n - n_hold, n)


def logged_inputs(logged: LabeledDecisions) -> npt.NDArray[np.float32]:
    """Head inputs of logged decisions, as training.fit.head_inputs builds them from prompts."""
    return np.hstack([logged.embedding, length_features(logged.prompt_chars)]).astype(np.float32)


def logged_words(logged: LabeledDecisions, tokenizer: RouterTokenizer) -> Tokens:
    """Tokens of logged decisions, for a head's lexical features: their prompts where the profile
    stored them (`store_prompts`); the others tokenize to [CLS] [SEP] alone, i.e. no words, and
    teach only the embedding's part of the head."""
    return tokenizer.tokens(logged.prompt)


def logged_terms(logged: LabeledDecisions, base: Terms, models: list[str], weight: float) -> Terms:
    """One correctness term per logged outcome (the chosen model on that prompt), rows from 0."""
    bar = [d for d, c in enumerate(base.compare) if c == "bar"]
    if not bar:
        raise ValueError("logged outcomes are correctness terms: train with a 'bar' data set (--datasets mmlu,...)")
    return Terms(
        row=np.arange(len(logged), dtype=np.int64),
        model=np.array([models.index(m) for m in logged.model], np.int64),
        dataset=np.full(len(logged), bar[0], np.int64),
        target=logged.outcome.astype(np.float32),
        compare=base.compare,
        reference=base.reference,
        n_models=base.n_models,
        weight=np.full(len(logged), weight, np.float32),
    )


def usable(
    logged: LabeledDecisions, models_root: Path, encoder_sha256: str, *known: list[str], first_stage: bool = False
) -> LabeledDecisions:
    """The rows both heads can learn from and be compared on: the chosen model is known to each
    head in `known`, and the decision's model version (when on disk) used this encoder (as its
    cascade's first stage, with `first_stage`)."""
    keep = np.ones(len(logged), bool)
    for models in known:
        keep &= np.isin(logged.model, models)
    if (~keep).any():
        log.warning("left out %d logged outcomes of models the heads do not know", int((~keep).sum()))
    for version in set(logged.model_version):
        try:
            manifest = read_manifest(models_root / version)
            stage = manifest.cascade if first_stage else manifest
            sha = stage.encoder.sha256 if stage is not None else ""
        except Exception:
            log.warning("model version %s is not in %s; its embeddings are assumed comparable", version, models_root)
            continue
        if sha != encoder_sha256:
            same = np.array([v == version for v in logged.model_version])
            log.warning("left out %d logged outcomes of %s: another encoder", int(same.sum()), version)
            keep &= ~same
    return logged.take(np.nonzero(keep)[0])


def seen_prompts(prep: F.Prepared, train_log: LabeledDecisions, holdout_fold: int,
                 min_cosine: float = SEEN_COSINE) -> npt.NDArray[np.bool_]:
    """(N,) base rows of the held-out fold whose prompt is among the logged outcomes the candidate
    trains on, so that neither head is scored on it. The log keeps no prompt text: a match is the
    same length in characters and an embedding cosine >= min_cosine (the server's int8 encoder
    gives a prompt's embedding up to batch effects)."""
    seen = np.zeros(len(prep.fold), bool)
    if not len(train_log):
        return seen
    dim = train_log.embedding.shape[1]
    by_chars: dict[int, list[int]] = {}
    for j, chars in enumerate(train_log.prompt_chars.astype(np.int64).tolist()):
        by_chars.setdefault(chars, []).append(j)
    for r in np.nonzero(prep.fold == holdout_fold)[0]:
        same_length = by_chars.get(len(prep.data.prompts[r]))
        if same_length and float((train_log.embedding[same_length] @ prep.X[r, :dim]).max()) >= min_cosine:
            seen[r] = True
    return seen


# -- both heads, seen the same way -------------------------------------------------------------


class OnnxHead(WinRateHead):
    """The live head.onnx behind WinRateHead's read API (logits, term_probability), its columns in
    `models` order, so training.fit's held-out figures run on it unchanged."""

    def __init__(self, model: LoadedModel, models: list[str], datasets: list[str]) -> None:
        super().__init__()
        self.session = model.head
        self.live_lexicon = model.lexicon
        self.dim = model.manifest.head.input_dim
        self.columns_ = [model.models.index(m) for m in models]  # ValueError: a model live does not know
        self.win_temperature_ = model.manifest.head.win_temperature
        self.win_pairs_ = list(model.manifest.head.win_pairs)
        self.gate_ = model.manifest.head.gate
        self.open_win_pairs_ = list(model.manifest.head.open_win_pairs)
        offsets = (model.manifest.head.model_extra or {}).get("judge_offsets", {})
        self.offset_ = np.array([offsets.get(d, 0.0) for d in datasets], np.float32)

    def logits(
        self, X: npt.NDArray[np.float32], tokens: Tokens | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        # head.onnx computes the length features from characters: invert them (exact to ~1e-6)
        chars = np.expm1(X[:, self.dim].astype(np.float64) / LENGTH_SCALE + LENGTH_CENTER)
        ability, difficulty = run_onnx_head(self.session, X[:, : self.dim], chars, self.live_lexicon, tokens)
        return ability[:, self.columns_], difficulty


def run_onnx_head(
    session: Any, embedding: np.ndarray, chars: np.ndarray, lexicon: Lexicon | None = None, tokens: Tokens | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A head.onnx on embeddings and lengths; one with a lexicon also on the prompts' words (`tokens`)."""
    lexical = None
    if lexicon is not None:
        if tokens is None:
            raise ValueError("this head reads the prompts' words: pass their tokens")
        lexical = lexicon.features(tokens.input_ids, tokens.lengths)
    return run_head(session, embedding, chars, lexical)


def logged_metrics(
    logits: Logits, models: list[str], logged: LabeledDecisions, floor: float,
    profiles: Mapping[str, Profile] | None = None, context: Mapping[str, LoggedContext] | None = None,
) -> dict[str, Any]:
    """How well a head's quality for the chosen model predicts the logged outcome; and, where
    decisions explored (propensity < 1), the IPS estimate of its policy's success rate."""
    ability, difficulty = logits(logged.embedding, logged.prompt_chars)
    col = {m: i for i, m in enumerate(models)}
    n = len(logged)
    q = sigmoid(ability[np.arange(n), [col[m] for m in logged.model]] - difficulty)
    y = logged.outcome
    out: dict[str, Any] = {
        "outcomes": n,
        "log_loss": E.log_loss(q, y),
        "ece": E.expected_calibration_error(q, y),
        "ece_noise95": E.calibrated_ece(q),  # what sampling noise alone gives a calibrated head on these
        "auc": E.auc(q, y),
        "brier": E.brier(q, y),
        "mean_quality": float(q.mean()),
        "mean_outcome": float(y.mean()),
    }
    ips = off_policy(ability, difficulty, col, logged, floor, profiles, context)
    if ips is not None:
        out["ips"] = ips
    return out


# -- off-policy: what each head's policy would have earned on the decisions that explored ------------


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedContext:
    """A decision's rule inputs that the log keeps beside LabeledDecisions' columns. The log keeps
    no stage, no per-request override and (unless the profile stores prompts) no prompt text, so a
    replayed decision sees rules on workflow, tenant and token counts only."""

    profile_version: str = ""
    workflow: str = ""
    tenant: str = ""
    input_tokens: int = 0


def logged_contexts(decision_log: DecisionLog, ids: Sequence[str], chunk: int = 500) -> dict[str, LoggedContext]:
    """decision id -> LoggedContext, read from the decisions table."""
    import sqlalchemy as sa

    d = decisions.c
    out: dict[str, LoggedContext] = {}
    with decision_log.engine.connect() as conn:
        for start in range(0, len(ids), chunk):
            query = sa.select(d.decision_id, d.profile_version, d.workflow, d.tenant, d.input_tokens).where(
                d.decision_id.in_(list(ids[start : start + chunk]))
            )
            for r in conn.execute(query):
                out[r.decision_id] = LoggedContext(r.profile_version, r.workflow, r.tenant, int(r.input_tokens))
    return out


def read_profiles(path: str) -> dict[str, Profile]:
    """The profiles the off-policy estimate replays decisions with; none (stand-in rule) if unreadable."""
    try:
        return load_profiles(Path(path))
    except ProfileError as e:
        log.warning("off-policy estimate without profiles (stand-in rule for every decision): %s", e)
        return {}


def _replayable(profile: Profile | None, scores: tuple[Any, ...], col: Mapping[str, int]) -> str:
    """Why a logged decision cannot be replayed with `profile` ("" when it can)."""
    if profile is None:
        return "not in the profiles file"
    if tuple((t.name, t.model) for t in profile.tiers) != tuple((s.tier, s.model) for s in scores):
        return "its tiers changed since the decision"
    if any(t.model not in col for t in profile.tiers):
        return "names a model this head does not know"
    return ""


def policy_choices(
    ability: np.ndarray, difficulty: np.ndarray, col: Mapping[str, int], logged: LabeledDecisions,
    rows: Sequence[int], floor: float, profiles: Mapping[str, Profile], context: Mapping[str, LoggedContext],
) -> tuple[npt.NDArray[np.int64], dict[str, Any]]:
    """The tier this head's policy gives each logged decision in `rows`: router.policy.decide with
    the profile the decision was logged under, without exploration (rng=None), as the server would
    decide it; where the profiles file lacks that profile (or its tiers changed), the stand-in rule:
    the cheapest logged tier whose quality clears `floor`, else the last. Returns the choices and
    which rule decided how many rows."""
    choice = np.empty(len(rows), np.int64)
    by_profile: dict[str, list[int]] = {}
    for j, i in enumerate(rows):
        by_profile.setdefault(logged.profile[i], []).append(j)
    used: dict[str, str] = {}
    n_decide = version_changed = 0
    for name, js in by_profile.items():
        profile = profiles.get(name)
        ok = [j for j in js if not _replayable(profile, logged.scores[rows[j]], col)]
        if ok and profile is not None:
            idx = [rows[j] for j in ok]
            ctx = [context.get(logged.decision_id[i], LoggedContext()) for i in idx]
            quality = tier_quality(ability[idx][:, [col[t.model] for t in profile.tiers]], difficulty[idx])
            decided = decide(
                profile, quality, np.array([c.input_tokens for c in ctx], np.int64), [""] * len(idx),
                [RequestContext(workflow=c.workflow, tenant=c.tenant) for c in ctx], rng=None,
            )  # fmt: skip
            choice[ok] = [c.tier_index for c in decided.choices]
            n_decide += len(ok)
            version_changed += sum(bool(c.profile_version) and c.profile_version != profile.version for c in ctx)
            used[name] = f"decide ({len(ok)})"
        rest = sorted(set(js) - set(ok))
        if rest:
            why = _replayable(profile, logged.scores[rows[rest[0]]], col)
            used[name] = (used[name] + ", " if name in used else "") + f"stand-in ({len(rest)}: {why})"
            for j in rest:
                i = rows[j]
                q = sigmoid(ability[i, [col[s.model] for s in logged.scores[i]]] - difficulty[i])
                clears = np.nonzero(q >= floor)[0]
                choice[j] = int(clears[0]) if len(clears) else len(q) - 1
    summary = {"decide": n_decide, "stand_in": len(rows) - n_decide, "profile_version_changed": version_changed,
               "profiles": used}  # fmt: skip
    return choice, summary


def off_policy(
    ability: np.ndarray, difficulty: np.ndarray, col: dict[str, int], logged: LabeledDecisions, floor: float,
    profiles: Mapping[str, Profile] | None = None, context: Mapping[str, LoggedContext] | None = None,
) -> dict[str, Any] | None:
    """Inverse propensity scoring over the decisions that explored: the head's policy
    (policy_choices) earns outcome / propensity where it agrees with the logged choice. SNIPS
    normalizes by the summed weights (lower variance)."""
    rows = [int(i) for i in np.nonzero(logged.propensity < 1.0)[0] if all(s.model in col for s in logged.scores[i])]
    if not rows:
        return None
    choice, policy = policy_choices(ability, difficulty, col, logged, rows, floor, profiles or {}, context or {})
    m = (choice == logged.tier_index[rows]).astype(np.float64)
    w = 1.0 / logged.propensity[rows]
    r = logged.outcome[rows].astype(np.float64)
    c = logged.cost_usd[rows]
    return {
        "decisions": len(rows),
        "floor": floor,
        "policy": policy,
        "agreement": float(m.mean()),
        "success_ips": float((m * w * r).mean()),
        "success_snips": float((m * w * r).sum() / (m * w).sum()) if m.any() else float("nan"),
        "cost_usd_ips": float((m * w * c).mean()),
        "success_logged": float(r.mean()),
    }


def describe_policy(ips: dict[str, Any]) -> str:
    """One line: which rule chose each head's tier in the off-policy estimate."""
    p = ips["policy"]
    parts = [f"{name}: {how}" for name, how in p["profiles"].items()]
    text = f"router.policy.decide with the logged profile, no exploration, for {p['decide']} of {ips['decisions']}"
    if p["stand_in"]:
        text += f"; stand-in rule (cheapest logged tier clearing {ips['floor']}) for {p['stand_in']}"
    if p["profile_version_changed"]:
        text += f"; {p['profile_version_changed']} logged under another version of their profile"
    return f"{text} [{'; '.join(parts)}]"


def dig(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return float(metrics)  # type: ignore[arg-type]


def log_checks(c: dict[str, Any], lv: dict[str, Any], label: str = "") -> list[tuple[bool | None, str]]:
    """The held-out log's part of GATE_RULE: log loss and ECE of a candidate head against live."""
    noise = c.get("ece_noise95", 0.0)
    ece_bar = max(lv["ece"] + ECE_SLACK, ECE_CEILING, noise)
    return [
        (c["log_loss"] <= lv["log_loss"] + LOG_LOSS_SLACK,
         f"{label}log loss   {c['log_loss']:.4f} <= {lv['log_loss']:.4f} + {LOG_LOSS_SLACK}"),
        (c["ece"] <= ece_bar, f"{label}ECE        {c['ece']:.4f} <= max({lv['ece']:.4f} + {ECE_SLACK}, {ECE_CEILING}"
                              + (f", noise {noise:.4f})" if noise else ")")),
    ]  # fmt: skip


def gate(candidate: dict[str, Any], live: dict[str, Any]) -> tuple[bool, list[str]]:
    """GATE_RULE applied: (promote, one line per check). A NaN or missing figure fails its check,
    except APGR, which is skipped when either side has none (no MMLU in the base data)."""
    checks: list[tuple[bool | None, str]] = []  # None: skipped
    if "decision_log" in candidate:
        checks += log_checks(candidate["decision_log"], live["decision_log"])
    else:  # too few of the main encoder's own outcomes: refitted on the base data alone, as live was
        checks.append((None, "main head: too few logged outcomes of its own; refitted on the base data alone"))
    if "first_stage" in candidate:  # a refitted cascade first stage, on the decisions it made
        checks += log_checks(candidate["first_stage"], live["first_stage"], "first stage: ")
    ca, la = dig(candidate.get("base", {}), APGR_PATH), dig(live.get("base", {}), APGR_PATH)
    if ca is None or la is None:
        checks.append((None, "APGR: no base-data figures for both heads"))
    else:
        checks.append((ca >= la - APGR_SLACK, f"base APGR  {ca:.4f} >= {la:.4f} - {APGR_SLACK}"))
    tag = {True: "pass", False: "FAIL", None: "skip"}
    return all(ok is not False for ok, _ in checks), [f"[{tag[ok]}] {text}" for ok, text in checks]


# -- a cascade's first stage -------------------------------------------------------------------


@dataclasses.dataclass
class StageFit:
    """A stage's head refitted on the base data plus the older logged outcomes of the decisions
    it made, and the figures of it and of the live head on the newest ones (held out)."""

    head: WinRateHead
    trained: LabeledDecisions
    held: LabeledDecisions
    candidate: dict[str, Any]  # logged_metrics on `held`
    live: dict[str, Any]


def fit_stage(
    cfg: RetrainConfig, prep: F.Prepared, logged: LabeledDecisions, live: Stage, live_models: list[str],
    profiles: Mapping[str, Profile], context: Mapping[str, LoggedContext],
) -> StageFit:
    """Learn one stage (`prep`: the base data through its encoder) from its logged outcomes."""
    if logged.embedding.shape[1] != live.encoder_spec.dim:
        raise ValueError(f"logged embeddings of {live.encoder_spec.name} are {logged.embedding.shape[1]}-d, "
                         f"the encoder's {live.encoder_spec.dim}")  # fmt: skip
    data = prep.data
    train_idx, hold_idx = time_split(len(logged), cfg.holdout_frac)
    trained, held = logged.take(train_idx), logged.take(hold_idx)
    log.info("%s: %d logged outcomes, %d to train on, the newest %d held out",
             live.encoder_spec.name, len(logged), len(trained), len(held))  # fmt: skip
    extra = (
        logged_inputs(trained),
        logged_terms(trained, prep.terms, data.models, cfg.log_weight),
        logged_words(trained, live.tokenizer),
    )
    head = F.train_head(cfg.fit_config(), prep, extra)
    held_words = logged_words(held, live.tokenizer)  # both heads score the held-out logged decisions

    def candidate_logits(emb: np.ndarray, chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert len(emb) == len(held_words.lengths), "logged_metrics scores `held`. This is a bug."
        return head.logits(np.hstack([emb, length_features(chars)]), held_words)

    def live_logits(emb: np.ndarray, chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return run_onnx_head(live.head, emb, chars, live.lexicon, held_words)

    return StageFit(
        head, trained, held,
        logged_metrics(candidate_logits, data.models, held, cfg.ips_floor, profiles, context),
        logged_metrics(live_logits, live_models, held, cfg.ips_floor, profiles, context),
    )  # fmt: skip


def first_stage_encoder(cfg: RetrainConfig, sha256: str) -> Path | None:
    """The encoder folder of the live first stage: --cascade-encoder-dir, else the folder under
    models/encoder whose encoder.json records the same sha256 (e.g. `make model-static`'s)."""
    if cfg.cascade_encoder_dir:
        return Path(cfg.cascade_encoder_dir)
    for meta in sorted((F.REPO / "models" / "encoder").glob("*/encoder.json")):
        if json.loads(meta.read_text("utf-8")).get("sha256") == sha256:
            return meta.parent
    return None


def refit_first_stage(
    cfg: RetrainConfig, logged: LabeledDecisions, live: LoadedModel, prep: F.Prepared, models_root: Path,
    profiles: Mapping[str, Profile], context: Mapping[str, LoggedContext],
) -> tuple[F.CascadeStage, StageFit] | str:
    """The live cascade's first stage learnt from `logged` (the decisions it made), or why the
    live one is kept unchanged ("" for a version without a first stage)."""
    spec, first = live.manifest.cascade, live.first_stage
    if spec is None or first is None:
        return ""
    enc_dir = first_stage_encoder(cfg, spec.encoder.sha256)
    if enc_dir is None:
        return (f"its encoder {spec.encoder.name} ({spec.encoder.sha256[:12]}) is not under models/encoder "
                "(make model-static) nor given by --cascade-encoder-dir")  # fmt: skip
    if json.loads((enc_dir / "encoder.json").read_text("utf-8"))["sha256"] != spec.encoder.sha256:
        return f"{enc_dir} is another encoder than the live first stage's ({spec.encoder.name})"
    data = prep.data
    logged = usable(logged, models_root, spec.encoder.sha256, data.models, live.models, first_stage=True)
    if len(logged) < max(cfg.min_outcomes, 2):
        return f"{len(logged)} logged outcomes of its decisions, fewer than --min-outcomes {cfg.min_outcomes}"
    meta, X, tokens = F.stage_inputs(enc_dir, data)
    fitted = fit_stage(cfg, F.Prepared(data, prep.terms, X, prep.fold, meta, tokens), logged, first, live.models,
                       profiles, context)  # fmt: skip
    return F.CascadeStage(enc_dir, meta, fitted.head, X, tokens), fitted


# -- the command -----------------------------------------------------------------------------


def retrain(cfg: RetrainConfig) -> dict[str, Any]:
    url = log_url(cfg.from_log)
    fit_cfg = cfg.fit_config()
    models_root = Path(cfg.models_dir)
    live_dir = resolve_model_dir(Path(cfg.live_dir or cfg.models_dir))

    # 1. logged decisions with outcomes, oldest first: those of the live model's main encoder and,
    # for a cascade, those of its first stage (its own encoder's embeddings); the live model itself
    # is checked in step 2
    live_manifest = read_manifest(live_dir) if (live_dir / MANIFEST).is_file() else None
    live_encoder = live_manifest.encoder.name if live_manifest is not None else None
    first = live_manifest.cascade if live_manifest is not None else None
    with DecisionLog(url) as decision_log:
        logged = decision_log.labeled(encoder=live_encoder)
        first_logged = decision_log.labeled(encoder=first.encoder.name, exact=True) if first is not None else None
        exploring = [d for part in (logged, first_logged) if part is not None
                     for d, p in zip(part.decision_id, part.propensity.tolist(), strict=True) if p < 1.0]  # fmt: skip
        context = logged_contexts(decision_log, exploring)
    n_first = len(first_logged) if first_logged is not None else 0
    result: dict[str, Any] = {"from_log": redact(url), "logged_outcomes": len(logged) + n_first, "promoted": False}
    if max(len(logged), n_first) < max(cfg.min_outcomes, 2):
        result["reason"] = f"{len(logged)} logged outcomes, fewer than --min-outcomes {cfg.min_outcomes}"
        if first is not None:  # a cascade: each stage learns from the decisions it made
            result["reason"] = (f"{len(logged)} logged outcomes of the main encoder's decisions and {n_first} of "
                                f"the cascade first stage's, each fewer than --min-outcomes {cfg.min_outcomes}")
        return result

    # 2. the base data (embedded, split), and the live model, which must share its encoder
    prep = F.prepare(fit_cfg)
    data, encoder_sha = prep.data, prep.encoder_meta["sha256"]
    live = load_model(live_dir, device="cpu", intra_op_threads=1)
    if live.manifest.encoder.sha256 != encoder_sha:
        raise ValueError(
            f"live model {live.version} has another encoder than {cfg.encoder_dir}: logged embeddings come "
            "from the live encoder, so the candidate must use the same one (--encoder-dir)"
        )
    logged = usable(logged, models_root, encoder_sha, data.models, live.models)
    # the main head learns from its logged outcomes when there are enough of them; below that (a
    # cascade whose first stage decides most calls) it is refitted on the base data alone
    main_learns = len(logged) >= max(cfg.min_outcomes, 2)
    if not main_learns and not n_first:
        result["reason"] = f"{len(logged)} usable logged outcomes, fewer than --min-outcomes {cfg.min_outcomes}"
        return result

    # 3. the candidate: base training folds plus the older logged outcomes; each head decides the
    #    exploring held-out decisions with the profile they were logged under
    profiles = read_profiles(cfg.profiles_path)
    main_fit = fit_stage(cfg, prep, logged, live.main_stage, live.models, profiles, context) if main_learns else None
    head = main_fit.head if main_fit is not None else F.train_head(fit_cfg, prep)
    train_log = main_fit.trained if main_fit is not None else logged.take(np.arange(0))
    held = main_fit.held if main_fit is not None else train_log

    # 4. both heads on the base data's held-out fold, less the prompts whose logged outcomes the
    #    candidate trained on
    seen = seen_prompts(prep, train_log, cfg.holdout_fold)
    eval_fold = np.where(seen, -1, prep.fold)
    candidate: dict[str, Any] = {
        "base": F.heldout_metrics(data, prep.terms, head, prep.X, eval_fold, fit_cfg, prep.tokens),
    }
    live_metrics: dict[str, Any] = {}
    if main_fit is not None:
        candidate["decision_log"], live_metrics["decision_log"] = main_fit.candidate, main_fit.live
    try:
        live_head = OnnxHead(live, data.models, data.datasets)
        live_metrics["base"] = F.heldout_metrics(data, prep.terms, live_head, prep.X, eval_fold, fit_cfg, prep.tokens)
    except ValueError as e:
        log.warning("no base-data figures for the live model (%s)", e)
    refitted = refit_first_stage(cfg, first_logged, live, prep, models_root, profiles, context) \
        if first_logged is not None else ""  # fmt: skip
    first_stage, first_fit = (None, None) if isinstance(refitted, str) else refitted
    kept_why = refitted if isinstance(refitted, str) else ""
    if first_fit is not None:
        candidate["first_stage"], live_metrics["first_stage"] = first_fit.candidate, first_fit.live
    elif kept_why:
        log.warning("the live cascade first stage is kept unchanged: %s", kept_why)
    if not main_learns and first_fit is None:
        result["reason"] = (f"{len(logged)} usable logged outcomes of the main encoder's decisions, fewer than "
                            f"--min-outcomes {cfg.min_outcomes}, and the cascade first stage cannot learn: {kept_why}")
        return result
    promote, checks = gate(candidate, live_metrics)

    # 5. the candidate's name: its fit config and data, plus the logged outcomes it learned from
    digest = hashlib.sha256()
    digest.update(F.result_hash(fit_cfg, data, prep.encoder_meta).encode())
    digest.update(f"log_weight={cfg.log_weight};".encode())
    for part in (train_log, *([first_fit.trained] if first_fit is not None else [])):
        for d, y in zip(part.decision_id, part.outcome.tolist(), strict=True):
            digest.update(f"{d}:{y};".encode())
    version = cfg.version or f"{dt.date.today():%Y%m%d}-{digest.hexdigest()[:8]}"
    window = {
        "from_log": redact(url),
        "outcomes_trained": len(train_log),
        "outcomes_held_out": len(held),
        "trained_until": str(train_log.created_at[-1]) if len(train_log) else None,
        "held_out_from": str(held.created_at[0]) if len(held) else None,
        "held_out_until": str(held.created_at[-1]) if len(held) else None,
        "log_weight": cfg.log_weight,
        "holdout_frac": cfg.holdout_frac,
        "live_version": live.version,
        "base_heldout_left_out": int(seen.sum()),
        "profiles_path": cfg.profiles_path,
    }
    if first_stage is not None and first_fit is not None:
        window["first_stage"] = {
            "encoder": first_stage.encoder_meta["name"],
            "outcomes_trained": len(first_fit.trained),
            "outcomes_held_out": len(first_fit.held),
        }
    elif kept_why:
        window["first_stage"] = {"kept": kept_why}
    result |= {
        "live_version": live.version,
        "candidate_version": version,
        "window": window,
        "gate": {"rule": GATE_RULE, "checks": checks, "promote": promote},
        "candidate": candidate,
        "live": live_metrics,
    }
    if cfg.dry_run:
        result["reason"] = "dry run: nothing written"
        return result

    # 6. tracked: both heads' figures; a promoted candidate is written, pointed at and registered
    manifest_metrics = candidate["base"] | {"decision_log": candidate.get("decision_log"), "promotion_gate": checks}
    if "first_stage" in candidate:
        manifest_metrics["first_stage_decision_log"] = candidate["first_stage"]
    write_cfg = dataclasses.replace(fit_cfg, version=version, set_default=True)
    provenance = {"decision_log": window}

    def publish(run_id: str | None) -> Path:
        return F.write_version(
            write_cfg, data, head, prep.X, manifest_metrics, prep.encoder_meta, run_id, provenance=provenance,
            cascade=first_stage,
            keep_cascade_from=None if first_stage is not None else live_dir,  # else the live cascade stage, unchanged
            tokens=prep.tokens,
        )

    if not cfg.track:
        if promote:
            result |= {"promoted": True, "out_dir": str(publish(None))}
        return result

    from training import tracking

    params = F.portable_config(cfg) | {"from_log": redact(url)}
    with tracking.run("retrain", params, {"kind": "retrain", "promoted": str(promote).lower()}) as run:
        run.log_metrics({"candidate": candidate, "live": live_metrics, "promoted": promote})
        run.log_dict({k: v for k, v in result.items() if k not in ("candidate", "live")}, "retrain.json")
        if promote:
            out = publish(run.run_id)
            run.log_artifact(out, "model")
            registry_version = tracking.register(run.run_id, "model", out.name, f"models/{out.name} (retrain)")
            result |= {"promoted": True, "out_dir": str(out), "registry_version": registry_version}
    result["mlflow_run_id"] = run.run_id
    return result


def report(result: dict[str, Any]) -> str:
    """The comparison and the gate, for people."""
    lines = [f"decision log {result['from_log']}: {result['logged_outcomes']} outcomes"]
    if "gate" not in result:
        return "\n".join([*lines, result.get("reason", "")])
    w = result["window"]
    c, lv = result["candidate"], result["live"]
    if "decision_log" in c:
        lines.append(
            f"  trained on {w['outcomes_trained']} (until {w['trained_until']}), held out the newest "
            f"{w['outcomes_held_out']} ({w['held_out_from']} .. {w['held_out_until']}; "
            f"mean outcome {c['decision_log']['mean_outcome']:.4f})"
        )
    else:
        lines.append("  main head: too few logged outcomes of its own decisions; refitted on the base data alone")
    rows = [
        ("log loss (held-out log)", ("decision_log", "log_loss")),
        ("ECE (held-out log)", ("decision_log", "ece")),
        ("AUC (held-out log)", ("decision_log", "auc")),
        ("mean predicted quality", ("decision_log", "mean_quality")),
        ("IPS success rate", ("decision_log", "ips", "success_ips")),
        ("SNIPS success rate", ("decision_log", "ips", "success_snips")),
        ("IPS cost per request (USD)", ("decision_log", "ips", "cost_usd_ips")),
        ("base APGR (MMLU, floor)", ("base", *APGR_PATH)),
    ]
    lines.append(f"  {'':26}{'live ' + result['live_version']:>28}{'candidate ' + result['candidate_version']:>30}")
    for name, path in rows:
        a, b = dig(lv, path), dig(c, path)
        if a is None and b is None:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"  {name:26}{fmt(a):>28}{fmt(b):>30}")
    if "first_stage" in c:
        f = w["first_stage"]
        lines.append(f"  cascade first stage ({f['encoder']}), refitted on the {f['outcomes_trained']} older "
                     f"outcomes of its decisions, held out the newest {f['outcomes_held_out']}:")  # fmt: skip
        for name, key in (("log loss", "log_loss"), ("ECE", "ece"), ("AUC", "auc")):
            a, b = lv["first_stage"][key], c["first_stage"][key]
            lines.append(f"    {name + ' (held-out log)':24}{a:>28.4f}{b:>30.4f}")
    elif "kept" in w.get("first_stage", {}):
        lines.append(f"  cascade first stage kept unchanged: {w['first_stage']['kept']}")
    if w.get("base_heldout_left_out"):
        lines.append(f"  (base figures leave out {w['base_heldout_left_out']} held-out prompts the candidate "
                     "learned from the log)")
    for who, figures in (("live", lv), ("candidate", c)):
        if "ips" in figures.get("decision_log", {}):
            ips = figures["decision_log"]["ips"]
            lines.append(f"  (IPS, {who}: {ips['decisions']} exploring decisions; {describe_policy(ips)})")
    lines.append("gate: " + result["gate"]["rule"])
    lines += ["  " + line for line in result["gate"]["checks"]]
    if result["promoted"]:
        lines.append(f"PROMOTED {result['candidate_version']} -> {result['out_dir']} (DEFAULT now names it)")
    else:
        lines.append(f"not promoted: {result.get('reason') or 'the candidate regresses on a check above'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = RetrainConfig()
    p = argparse.ArgumentParser(prog="python -m training retrain", description=__doc__)
    p.add_argument(
        "--from-log", required=True, help="the decision log: a URL (sqlite:///..., postgresql+psycopg://...) or a file"
    )
    p.add_argument("--datasets", default=",".join(defaults.datasets), help="base data sets, comma-separated (as fit)")
    p.add_argument("--no-track", dest="track", action="store_false", help="skip MLflow")
    p.add_argument("--dry-run", action="store_true", help="fit and compare; write no version and track nothing")
    for name in (
        "holdout_frac", "min_outcomes", "log_weight", "ips_floor", "profiles_path", "live_dir",
        "data_dir", "encoder_dir", "models_dir", "version", "k_folds", "holdout_fold", *HEAD_FIELDS, "limit",
    ):  # fmt: skip
        flag, kind = "--" + name.replace("_", "-"), F.arg_type(RetrainConfig, name)
        p.add_argument(flag, type=kind, default=getattr(defaults, name))
    p.add_argument(
        "--cascade-encoder-dir", default="",
        help="the live cascade first stage's encoder folder, to refit that stage on the decisions it made "
        "(default: the folder under models/encoder with its sha256; without one the stage is kept unchanged)",
    )  # fmt: skip
    F.add_no_lexical(p)
    args = vars(p.parse_args(argv))
    args["datasets"] = [d for d in args["datasets"].split(",") if d]
    result = retrain(RetrainConfig(**args))
    print(report(result))
    keys = ("promoted", "candidate_version", "live_version", "out_dir", "mlflow_run_id", "registry_version", "reason")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0
