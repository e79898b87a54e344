"""`python -m training fit`: embed the shared data, fit the head, check it on held-out prompts, write a version."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shutil
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router.artifacts import DEFAULT_POINTER, MANIFEST, MANIFEST_FORMAT, GateSpec, WinPair, load_model, sha256_file
from router.lexical import Tokens
from router.scoring import (
    LENGTH_FEATURES,
    WinCalibration,
    closed_form,
    fit_platt,
    fit_temperature,
    length_features,
    sigmoid,
)
from training import data as D
from training import evaluate as E
from training.embed import Embedder
from training.export import export_head
from training.model import HEAD_FIELDS, HeadConfig, Terms, WinRateHead

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
# The shipped encoder: MiniLM's first 2 of 6 layers, int8 (`make model`; docs/benchmarks.md,
# "Choosing the encoder": the fastest within 0.01 APGR of the best encoder measured).
DEFAULT_ENCODER = REPO / "models" / "encoder" / "all-MiniLM-L6-v2-first2-int8"


@dataclass
class FitConfig(HeadConfig):
    """Everything that decides the result; logged whole with the run and in the manifest."""

    datasets: list[str] = field(default_factory=lambda: ["mmlu", "alpaca_eval", "alpaca_eval_binary"])
    data_dir: str = str(D.DATA_DIR)
    encoder_dir: str = str(DEFAULT_ENCODER)
    # a cascade's first stage: this encoder (the static one, `make model-static`) with a head of the
    # same config fitted on its embeddings, written under cascade/ (router.engine); "" for none
    cascade_encoder_dir: str = ""
    models_dir: str = str(REPO / "models")  # writes <models_dir>/<version>/
    version: str = ""  # empty: the date and a hash of this config and the data
    set_default: bool = True  # point <models_dir>/DEFAULT at the new version
    k_folds: int = 10  # prompts are split into k folds by a hash of their text ...
    holdout_fold: int = 0  # ... and this one is never trained on; its figures go in the manifest
    limit: int | None = None  # first rows per file only (tests)
    track: bool = True  # an MLflow run per fit, and the version registered (training.tracking)


def head_inputs(embedding: np.ndarray, prompts: list[str]) -> np.ndarray:
    """What the head sees: the embedding and the prompt's length features (router.scoring)."""
    return np.hstack([embedding, length_features([len(p) for p in prompts])]).astype(np.float32)


def build_terms(data: D.RoutingData) -> Terms:
    compare = tuple(D.FILES[d]["compare"] for d in data.datasets)
    if D.REFERENCE_MODEL in data.models:
        reference = data.models.index(D.REFERENCE_MODEL)
    elif "reference" in compare:
        raise ValueError(f"AlpacaEval files need {D.REFERENCE_MODEL} in the data (train with mmlu too)")
    else:
        reference = 0  # unused: no data set compares with a reference
    return Terms(data.row, data.model, data.dataset, data.target, compare, reference, len(data.models))


def pairwise_by_pair(
    data: D.RoutingData, ability: np.ndarray, rows: np.ndarray, *, against_reference: bool = False
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For every pair of models labeled on the same prompts (over `rows`): their ability
    differences, outcomes (1 first better, 0 worse, 0.5 tie) and prompt rows. With
    `against_reference`, instead the comparisons the judged data sets made: each judged model
    against the reference, (model, reference), whose outcome is the label itself."""
    found: dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = {}

    def add(first: str, second: str, diff: np.ndarray, outcome: np.ndarray, at: np.ndarray) -> None:
        diffs, outcomes, where = found.setdefault((first, second), ([], [], []))
        diffs.append(diff)
        outcomes.append(outcome)
        where.append(at)

    for name in data.datasets:
        judged = D.FILES[name]["compare"] == "reference"
        if against_reference and not judged:
            continue
        drows, models, mat = data.outcome_matrix(name)
        keep = np.isin(drows, rows)
        drows, mat = drows[keep], mat[keep]
        cols = [data.models.index(m) for m in models]
        if against_reference:
            ref = data.models.index(D.REFERENCE_MODEL)
            for i, m in enumerate(models):
                add(m, D.REFERENCE_MODEL, ability[drows, cols[i]] - ability[drows, ref], mat[:, i].astype(np.float64),
                    drows)
            continue
        for i in range(len(cols)):
            for j in range(i + 1, len(cols)):
                add(models[i], models[j], ability[drows, cols[i]] - ability[drows, cols[j]],
                    np.sign(mat[:, i] - mat[:, j]) * 0.5 + 0.5, drows)
    return {k: (np.concatenate(d), np.concatenate(o), np.concatenate(r)) for k, (d, o, r) in found.items()}


def pairwise_outcomes(data: D.RoutingData, ability: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pairwise_by_pair pooled over all pairs (the data a win temperature is fitted on)."""
    by_pair = pairwise_by_pair(data, ability, rows)
    return (np.concatenate([d for d, _, _ in by_pair.values()]), np.concatenate([o for _, o, _ in by_pair.values()]))


def fit_win_temperature(data: D.RoutingData, ability: np.ndarray, rows: np.ndarray) -> float:
    """Temperature that calibrates the served win probability on the training prompts."""
    return fit_temperature(*pairwise_outcomes(data, ability, rows))


MIN_PAIR_OUTCOMES = 300  # fewer shared outcomes than this: the pair uses the pooled temperature


Refit = typing.Callable[[np.ndarray], WinRateHead]  # a head like the calibrated one, fitted without these rows
OPEN_CALIBRATION_FOLDS = 2  # inner folds whose heads score the judged prompts for their calibration


def calibrate_win(
    data: D.RoutingData, head: WinRateHead, X: np.ndarray, rows: np.ndarray, tokens: Tokens | None = None,
    refit: Refit | None = None,
) -> None:
    """Set the head's pooled win temperature and its per-pair calibration from `rows`, and with
    both kinds of data set its gate and open-ended calibration. With `refit`, that calibration is
    fitted on scores the judged prompts get from heads that did not train on them (crossfit_ability):
    on a few hundred judged prompts the head's own training scores are sharper than on new ones."""
    ability, _ = head.logits(X, tokens)  # once for all
    head.win_temperature_ = fit_win_temperature(data, ability, rows)
    head.win_pairs_ = fit_win_pairs(data, ability, rows)
    head.gate_ = fit_gate(data, X, rows)
    head.open_win_pairs_ = []
    if head.gate_ is not None:
        scores = ability if refit is None else crossfit_ability(data, X, rows, tokens, refit)
        head.open_win_pairs_ = fit_win_pairs(data, scores, rows, judged=True)


def crossfit_ability(
    data: D.RoutingData, X: np.ndarray, rows: np.ndarray, tokens: Tokens | None, refit: Refit
) -> np.ndarray:
    """(N, M) abilities in which each judged prompt among `rows` is scored by a head fitted
    without its inner fold (OPEN_CALIBRATION_FOLDS, split by a salted prompt hash, so a prompt's
    copies in both AlpacaEval files fall on one side); other rows are left at 0."""
    judged = rows[prompt_kinds(data)[rows] == 0]
    inner = D.folds([data.prompts[r] for r in judged], OPEN_CALIBRATION_FOLDS, salt="open-calibration")
    out = np.zeros((len(X), len(data.models)), np.float32)
    for f in range(OPEN_CALIBRATION_FOLDS):
        held = judged[inner == f]
        if len(held):
            out[held] = refit(held).logits(X[held], None if tokens is None else tokens.take(held))[0]
    return out


def refitter(cfg: HeadConfig, X: np.ndarray, terms: Terms, tokens: Tokens | None) -> Refit:
    """crossfit_ability's `refit`: a head of `cfg` on `terms` without the given prompt rows."""

    def refit(held: np.ndarray) -> WinRateHead:
        return cfg.make_head().fit(X, terms.subset(~np.isin(terms.row, held)), tokens)

    return refit


def fit_win_pairs(data: D.RoutingData, ability: np.ndarray, rows: np.ndarray, *, judged: bool = False) -> list[WinPair]:
    """Per-pair Platt calibration of the win probability on the training prompts (`ability`:
    the head's logits on every row): one temperature cannot fit every pair (MMLU's correctness
    ties and AlpacaEval's judged preferences sit on different scales). `judged`: the pairs of
    each judged model with the reference it was judged against, for open-ended requests."""
    pairs = []
    for (a, b), (diff, outcome, _) in sorted(pairwise_by_pair(data, ability, rows, against_reference=judged).items()):
        if len(diff) >= MIN_PAIR_OUTCOMES:
            scale, bias = fit_platt(diff, outcome)
            pairs.append(WinPair(first=a, second=b, scale=scale, bias=bias, n=len(diff)))
    return pairs


def prompt_kinds(data: D.RoutingData) -> np.ndarray:
    """(n_rows,) 1 for a prompt from a data set graded right or wrong, 0 for one judged against a reference."""
    return np.array([D.FILES[data.datasets[d]]["compare"] == "bar" for d in data.row_dataset()], np.int64)


# inverse ridge of the gate's logistic regression (docs/evaluation.md, "Win probability on open-ended requests")
GATE_C = 1.0


def fit_gate(data: D.RoutingData, X: np.ndarray, rows: np.ndarray) -> GateSpec | None:
    """router.scoring.closed_form's gate, fitted on the training prompts' embeddings (not the
    length features) to tell which kind of data set each came from; None unless both kinds are there."""
    from sklearn.linear_model import LogisticRegression

    kind = prompt_kinds(data)[rows]
    if kind.min() == kind.max():
        return None
    emb = X[rows, : X.shape[1] - len(LENGTH_FEATURES)]
    lr = LogisticRegression(C=GATE_C, class_weight="balanced", max_iter=5000).fit(emb, kind)
    return GateSpec(
        weight=[float(w) for w in lr.coef_[0].astype(np.float32)],
        bias=float(np.float32(lr.intercept_[0])),
        closed_prompts=int(kind.sum()),
        open_prompts=int(len(kind) - kind.sum()),
    )


def closed_probability(head: WinRateHead, X: np.ndarray) -> np.ndarray | None:
    """The head's gate on head inputs X (embedding and length features): P(closed-form) per row."""
    gate = getattr(head, "gate_", None)
    if gate is None:
        return None
    dim = X.shape[1] - len(LENGTH_FEATURES)
    return closed_form(np.asarray(X[:, :dim], np.float32), np.asarray(gate.weight, np.float32), gate.bias)


def win_probability(
    head: WinRateHead, first: str, second: str, diff: np.ndarray, closed: np.ndarray | None = None
) -> np.ndarray:
    """What the server answers for P(first beats second) given s_first - s_second, and for a
    head with a gate, each row's P(closed-form) (closed_probability)."""
    calibration = WinCalibration.of(
        [second, first], head.win_pairs_, head.open_win_pairs_, head.win_temperature_, head.gate_
    )
    ability = np.stack([np.zeros_like(diff), diff], axis=1).astype(np.float32)
    return calibration.win(ability, closed)[:, 1]


def mmlu_routing_figures(
    data: D.RoutingData, head: WinRateHead, X: np.ndarray, rows: np.ndarray, tokens: Tokens | None = None
) -> dict[str, Any]:
    """Strong/weak routing on held-out MMLU prompts, beside the baselines."""
    mrows, models, mat = data.outcome_matrix("mmlu")
    keep = np.isin(mrows, rows)
    mrows, mat = mrows[keep], mat[keep]
    weak, strong = models.index("mixtral-8x7b-instruct-v0.1"), models.index(D.REFERENCE_MODEL)
    q_weak, q_strong = mat[:, weak], mat[:, strong]
    ability, difficulty = head.logits(X[mrows], None if tokens is None else tokens.take(mrows))
    mw, ms = data.models.index(models[weak]), data.models.index(models[strong])
    p_weak = sigmoid(ability[:, mw] - difficulty)
    p_strong = sigmoid(ability[:, ms] - difficulty)
    closed = closed_probability(head, X[mrows])
    win = win_probability(head, models[strong], models[weak], ability[:, ms] - ability[:, mw], closed)
    lengths = np.array([len(data.prompts[r]) for r in mrows], np.float64)
    # Three ways to rank prompts for the strong model: the quality floor (serving's rule:
    # weak quality lowest first), the expected gain P(strong ok) - P(weak ok), and the
    # Bradley-Terry strong-win probability (RouteLLM's score).
    scores = {"router_floor": 1.0 - p_weak, "router_gain": p_strong - p_weak, "router_win": win}
    scores |= E.baseline_scores(q_weak, q_strong, lengths)
    out: dict[str, Any] = {name: E.router_figures(s, q_weak, q_strong) for name, s in scores.items()}
    strong_only = (q_strong > 0.5) & (q_weak < 0.5)
    out["strong_win_auc"] = {"router": E.auc(win, strong_only), "prompt_length": E.auc(lengths, strong_only)}
    out["n_prompts"] = int(len(mrows))
    return out


def length_baseline_logloss(data: D.RoutingData, terms: Terms, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """A per-(data set, model) logistic fit on log prompt length: the bar the head must clear."""
    from sklearn.linear_model import LogisticRegression

    loglen = np.log1p([len(p) for p in data.prompts])[:, None]
    out: dict[str, float] = {}
    for d, name in enumerate(data.datasets):
        losses, weights = [], []
        for m in np.unique(terms.model[terms.dataset == d]):
            sel = (terms.dataset == d) & (terms.model == m)
            tr, te = sel & train, sel & test
            y = terms.target[tr]
            # soft targets: duplicate each row as a 1 and a 0 weighted by the score
            Xtr = np.concatenate([loglen[terms.row[tr]]] * 2)
            ytr = np.concatenate([np.ones_like(y), np.zeros_like(y)])
            w = np.concatenate([y, 1 - y])
            clf = LogisticRegression().fit(Xtr, ytr, sample_weight=w)
            p = clf.predict_proba(loglen[terms.row[te]])[:, 1]
            losses.append(E.log_loss(p, terms.target[te]))
            weights.append(te.sum())
        out[name] = float(np.average(losses, weights=weights))
    return out


def heldout_metrics(
    data: D.RoutingData, terms: Terms, head: WinRateHead, X: np.ndarray, fold: np.ndarray, cfg: FitConfig,
    tokens: Tokens | None = None,
) -> dict[str, Any]:
    test_rows = np.nonzero(fold == cfg.holdout_fold)[0]
    row_test = np.isin(terms.row, test_rows)
    p = head.term_probability(X, terms, tokens)
    metrics: dict[str, Any] = {
        "split": f"fold {cfg.holdout_fold} of {cfg.k_folds} by prompt hash",
        "heldout_prompts": int(len(test_rows)),
    }
    base = length_baseline_logloss(data, terms, ~row_test, row_test)
    for d, name in enumerate(data.datasets):
        sel = row_test & (terms.dataset == d)
        metrics[name] = {
            "log_loss": E.log_loss(p[sel], terms.target[sel]),
            "log_loss_prompt_length": base[name],
            "auc": E.auc(p[sel], terms.target[sel]),
            "ece": E.expected_calibration_error(p[sel], terms.target[sel]),
            "terms": int(sel.sum()),
        }
    ability, _ = head.logits(X, tokens)
    by_pair = pairwise_by_pair(data, ability, test_rows)
    diff, outcome, _ = (np.concatenate(parts) for parts in zip(*by_pair.values(), strict=True))
    closed = closed_probability(head, X)

    def served(pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        return np.concatenate([
            win_probability(head, a, b, d, None if closed is None else closed[r]) for (a, b), (d, _, r) in pairs.items()
        ])

    metrics["win_probability"] = {
        "temperature": head.win_temperature_,
        "fitted_pairs": len(head.win_pairs_),
        "ece": E.expected_calibration_error(served(by_pair), outcome),
        "ece_one_temperature": E.expected_calibration_error(sigmoid(diff / head.win_temperature_), outcome),
        "ece_plain_bradley_terry": E.expected_calibration_error(sigmoid(diff), outcome),
        "pairs": int(len(diff)),
    }
    # the judged pairs with the reference (what a gateway's frontier tier against a cheaper one is
    # on open-ended requests): the served figure, with and without the gate
    judged = pairwise_by_pair(data, ability, test_rows, against_reference=True)
    if judged:
        j_outcome = np.concatenate([o for _, o, _ in judged.values()])
        no_gate = np.concatenate([win_probability(head, a, b, d) for (a, b), (d, _, _) in judged.items()])
        metrics["win_probability"]["against_reference"] = {
            "ece": E.expected_calibration_error(served(judged), j_outcome),
            "ece_without_gate": E.expected_calibration_error(no_gate, j_outcome),
            "fitted_pairs": len(getattr(head, "open_win_pairs_", [])),
            "pairs": int(len(j_outcome)),
        }
    if (gate := getattr(head, "gate_", None)) is not None and closed is not None:
        kind = prompt_kinds(data)[test_rows]
        metrics["gate"] = {
            "auc": E.auc(closed[test_rows], kind),
            "mean_closed_prompts": float(closed[test_rows][kind == 1].mean()) if kind.any() else None,
            "mean_open_prompts": float(closed[test_rows][kind == 0].mean()) if (kind == 0).any() else None,
            "fitted_on": {"closed": gate.closed_prompts, "open": gate.open_prompts},
        }
    if "mmlu" in data.datasets:
        metrics["mmlu_routing"] = mmlu_routing_figures(data, head, X, test_rows, tokens)
    return metrics


PATH_FIELDS = ("data_dir", "encoder_dir", "cascade_encoder_dir", "models_dir")
# Bump when training code changes what a config produces, so the version name changes too.
# 2: win temperature fitted on the training prompts. 3: prompt-length features at the head's input.
# 4: a ReLU layer in front of the head; per-pair win calibration. 5: lexical features (router.lexical).
# 6: prompts embedded one per encoder run (training.embed.Embedder), not in batches.
# 7: a closed-form/open-ended gate and the open-ended win calibration beside the head.
# 8: that calibration fitted on scores from heads that did not train on the judged prompts.
ALGORITHM = 8


def portable_config(cfg: FitConfig) -> dict[str, Any]:
    """The config as logged: paths inside the repo relative to it, so manifests don't name a machine."""
    out = asdict(cfg)
    for name in PATH_FIELDS:
        if not out[name]:
            continue
        p = Path(out[name]).resolve()
        out[name] = str(p.relative_to(REPO.parent)) if p.is_relative_to(REPO.parent) else str(p)
    return out


def result_hash(
    cfg: FitConfig, data: D.RoutingData, encoder_meta: dict[str, Any], cascade_sha256: str = ""
) -> str:
    """Hash of what decides the trained head(s): config (not paths), data, encoder(s)."""
    decisive = {k: v for k, v in asdict(cfg).items() if k not in PATH_FIELDS + ("version", "set_default", "track")}
    blob = json.dumps(decisive, sort_keys=True) + D.data_hash(data.files) + encoder_meta["sha256"] + f"a{ALGORITHM}"
    if cascade_sha256:  # only then: the hash of a version without a cascade stays what it was
        blob += "cascade" + cascade_sha256
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CascadeStage:
    """The first stage of a cascade, fitted: its encoder's folder and record, head and inputs."""

    encoder_dir: Path
    encoder_meta: dict[str, Any]
    head: WinRateHead
    X: np.ndarray
    tokens: Tokens  # the prompts through this encoder's tokenizer


def encoder_licenses(encoder_meta: dict[str, Any], what: str = "encoder") -> dict[str, str]:
    """The manifest's license lines for an encoder's parts (weights, package), from its encoder.json."""
    return {f"{what} {part} ({info['from']})": info["license"] for part, info in encoder_meta["licenses"].items()}


def write_stage(
    tmp: Path, sub: str, enc_dir: Path, encoder_meta: dict[str, Any], head: WinRateHead, X: np.ndarray,
    data: D.RoutingData, cfg: FitConfig, tokens: Tokens | None = None,
) -> dict[str, Any]:
    """Copy an encoder into tmp/sub, export its head there (parity-checked on X's first rows, and
    `tokens`' for a head with lexical features, whose lexicon goes beside it), and return the
    manifest's `encoder` and `head` records for them."""
    (tmp / sub).mkdir(parents=True, exist_ok=True)
    for name in ("encoder.onnx", "tokenizer.json"):
        shutil.copy2(enc_dir / name, tmp / sub / name)
    dim = X.shape[1] - len(LENGTH_FEATURES)  # X = [embedding, length features] (head_inputs)
    n = min(len(X), 2048)
    chars = np.array([len(p) for p in data.prompts[:n]], np.float32)
    parity = export_head(head, tmp / sub / "head.onnx", X[:n, :dim], chars, tokens and tokens.take(np.arange(n)))
    prefix = "" if sub == "." else sub + "/"
    lexicon = None
    if (lex := getattr(head, "lexicon_", None)) is not None:
        lex.save(tmp / sub / "lexicon.npz")
        lexicon = {
            "file": prefix + "lexicon.npz",
            "sha256": sha256_file(tmp / sub / "lexicon.npz"),
            "features": lex.size,
            "min_df": lex.min_df,
        }
    return {
        "encoder": {
            "name": encoder_meta["name"],
            "file": prefix + "encoder.onnx",
            "tokenizer": prefix + "tokenizer.json",
            "sha256": sha256_file(tmp / sub / "encoder.onnx"),
            "dim": int(dim),
            "max_tokens": int(encoder_meta["max_tokens"]),
            "source": encoder_meta.get("source"),
            "pooling": "mean",
            "normalized": True,
            "parity": encoder_meta.get("parity"),
        },
        "head": {
            "kind": "mf-bradley-terry",
            "algorithm": ALGORITHM,
            "file": prefix + "head.onnx",
            "sha256": sha256_file(tmp / sub / "head.onnx"),
            "input_dim": int(dim),
            "features": list(LENGTH_FEATURES),
            "models": data.models,
            "rank": cfg.rank,
            "hidden": cfg.hidden,  # ReLU layer in front of the MF head (0: linear)
            "judge_offsets": dict(zip(data.datasets, head.offset_.tolist(), strict=True)),
            "parity_max_abs_diff": parity,
            "win_temperature": head.win_temperature_,
            "win_pairs": [p.model_dump() for p in head.win_pairs_],
            **({"gate": gate.model_dump(), "open_win_pairs": [p.model_dump() for p in head.open_win_pairs_]}
               if (gate := getattr(head, "gate_", None)) is not None else {}),
            **({"lexicon": lexicon} if lexicon else {}),
        },
    }


def write_version(
    cfg: FitConfig,
    data: D.RoutingData,
    head: WinRateHead,
    X: np.ndarray,
    metrics: dict[str, Any],
    encoder_meta: dict[str, Any],
    run_id: str | None,
    *,
    provenance: dict[str, Any] | None = None,
    cascade: CascadeStage | None = None,
    keep_cascade_from: Path | None = None,
    tokens: Tokens | None = None,
) -> Path:
    """Write <models_dir>/<version>/ (head exported with a parity check on X's first rows, which
    must be `data`'s prompts; a cascade's first stage under cascade/) and, with cfg.set_default,
    point DEFAULT at it. `provenance` adds to the manifest's training record (e.g. the decision
    log a retrain learned from). `keep_cascade_from`: a version whose cascade stage is copied
    unchanged (a retrain keeps the live version's first stage)."""
    cascade_sha = cascade.encoder_meta["sha256"] if cascade else ""
    version = cfg.version or f"{dt.date.today():%Y%m%d}-{result_hash(cfg, data, encoder_meta, cascade_sha)[:8]}"
    out = Path(cfg.models_dir) / version
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    main = write_stage(tmp, ".", Path(cfg.encoder_dir), encoder_meta, head, X, data, cfg, tokens)
    licenses = encoder_licenses(encoder_meta)
    if cascade is not None:
        c = cascade
        first = write_stage(tmp, "cascade", c.encoder_dir, c.encoder_meta, c.head, c.X, data, cfg, c.tokens)
        licenses |= encoder_licenses(c.encoder_meta, "cascade encoder")
    kept: dict[str, Any] | None = None
    if keep_cascade_from is not None:
        source = json.loads((keep_cascade_from / MANIFEST).read_text("utf-8"))
        kept = source.get("cascade")
        if kept is not None and kept["head"]["models"] != data.models:
            log.warning("not keeping %s's cascade stage: its head scores other models", keep_cascade_from.name)
            kept = None
        if kept is not None:
            for spec in (kept["encoder"], kept["head"]):
                for name in (spec["file"], spec.get("tokenizer"), (spec.get("lexicon") or {}).get("file")):
                    if name:
                        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(keep_cascade_from / name, tmp / name)
            licenses |= {k: v for k, v in source.get("licenses", {}).items() if k.startswith("cascade ")}
    licenses |= {f"data {f['file']}": str(f["license"]) for f in data.files}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **main,
        **({"cascade": first} if cascade is not None else {"cascade": kept} if kept is not None else {}),
        "training": {
            "config": portable_config(cfg),
            "data": data.files,
            "data_sha256": D.data_hash(data.files),
            "train_loss": head.train_loss_,
            **(provenance or {}),
        },
        "licenses": licenses,
        "metrics": metrics,
        "mlflow_run_id": run_id,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    load_model(tmp, device="cpu")  # refuse to publish what the server would refuse to load
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if cfg.set_default:
        (Path(cfg.models_dir) / DEFAULT_POINTER).write_text(version + "\n", "utf-8")
    return out


@dataclass
class Prepared:
    """The base data embedded and split by prompt hash: what fit and retrain start from."""

    data: D.RoutingData
    terms: Terms
    X: np.ndarray  # (N, dim + 2) head inputs, one row per prompt
    fold: np.ndarray  # (N,) fold of each prompt
    encoder_meta: dict[str, Any]
    tokens: Tokens  # (N, T) word pieces of each prompt, for a head's lexical features


def prepare(cfg: FitConfig) -> Prepared:
    # 1. data: every prompt of the chosen files, outcome terms in long form
    data = D.load(cfg.datasets, Path(cfg.data_dir), cfg.limit)
    terms = build_terms(data)
    log.info("%d prompts, %d outcome terms, %d models", data.n_rows, len(terms.target), len(data.models))

    # 2. embeddings through the serving encoder (cached by the encoder's hash)
    encoder_meta, X, tokens = stage_inputs(Path(cfg.encoder_dir), data)  # X: (N, dim + 2)
    return Prepared(data, terms, X, D.folds(data.prompts, cfg.k_folds), encoder_meta, tokens)


def append_rows(X: np.ndarray, terms: Terms, X_extra: np.ndarray, extra: Terms) -> tuple[np.ndarray, Terms]:
    """Head inputs and terms with extra rows (their `row` counts from 0) after the first ones."""
    w = np.ones(len(terms.target), np.float32) if terms.weight is None else terms.weight
    w_extra = np.ones(len(extra.target), np.float32) if extra.weight is None else extra.weight
    joined = Terms(
        np.concatenate([terms.row, extra.row + len(X)]),
        np.concatenate([terms.model, extra.model]),
        np.concatenate([terms.dataset, extra.dataset]),
        np.concatenate([terms.target, extra.target]),
        terms.compare,
        terms.reference,
        terms.n_models,
        np.concatenate([w, w_extra]),
    )
    return np.vstack([X, X_extra]).astype(np.float32), joined


def train_head(
    cfg: FitConfig, prep: Prepared, extra: tuple[np.ndarray, Terms, Tokens] | None = None
) -> WinRateHead:
    """Fit on the training folds (plus `extra` rows, terms and tokens, e.g. logged outcomes), then
    fit the win temperature and the per-pair win calibration on the training prompts."""
    # 3. split by prompt hash and fit on the training folds only
    train = prep.fold[prep.terms.row] != cfg.holdout_fold
    X, terms, tokens = prep.X, prep.terms.subset(train), prep.tokens
    if extra is not None:
        X, terms = append_rows(X, terms, extra[0], extra[1])
        tokens = tokens.append(extra[2])
    head = cfg.make_head()
    head.fit(X, terms, tokens)
    refit = refitter(cfg, X, terms, tokens)
    calibrate_win(prep.data, head, prep.X, np.nonzero(prep.fold != cfg.holdout_fold)[0], prep.tokens, refit)
    return head


def stage_inputs(enc_dir: Path, data: D.RoutingData) -> tuple[dict[str, Any], np.ndarray, Tokens]:
    """An encoder folder's record, and `data`'s prompts through it: head inputs and word pieces."""
    meta = json.loads((enc_dir / "encoder.json").read_text("utf-8"))
    embedder = Embedder(enc_dir / "encoder.onnx", enc_dir / "tokenizer.json", int(meta["max_tokens"]))
    return meta, head_inputs(embedder.embed(data.prompts), data.prompts), embedder.tokens(data.prompts)


def fit_cascade(
    cfg: FitConfig, data: D.RoutingData, terms: Terms, fold: np.ndarray
) -> tuple[CascadeStage, dict[str, Any]]:
    """The cascade's first stage: the same head config on cfg.cascade_encoder_dir's embeddings,
    the same folds; and its held-out figures."""
    enc_dir = Path(cfg.cascade_encoder_dir)
    meta, X, tokens = stage_inputs(enc_dir, data)
    head = train_head(cfg, Prepared(data, terms, X, fold, meta, tokens))
    metrics = heldout_metrics(data, terms, head, X, fold, cfg, tokens)
    return CascadeStage(enc_dir, meta, head, X, tokens), metrics


def fit(cfg: FitConfig) -> dict[str, Any]:
    prep = prepare(cfg)
    data, terms, X, fold, encoder_meta = prep.data, prep.terms, prep.X, prep.fold, prep.encoder_meta
    head = train_head(cfg, prep)

    # 4. held-out figures beside baselines, then export with a parity check
    metrics = heldout_metrics(data, terms, head, X, fold, cfg, prep.tokens)
    cascade = None
    if cfg.cascade_encoder_dir:
        cascade, metrics["cascade_first_stage"] = fit_cascade(cfg, data, terms, fold)
    if not cfg.track:
        out = write_version(cfg, data, head, X, metrics, encoder_meta, None, cascade=cascade, tokens=prep.tokens)
        return {"out_dir": str(out), "metrics": metrics}

    # 5. the same, tracked: params = this config, metrics, the version's files; registered
    from training import tracking

    with tracking.run("fit", portable_config(cfg), {"kind": "fit"}) as run:
        out = write_version(
            cfg, data, head, X, metrics, encoder_meta, run.run_id, cascade=cascade, tokens=prep.tokens
        )
        run.log_metrics(metrics | {"train_loss": head.train_loss_})
        run.log_artifact(out, "model")
        registry_version = tracking.register(run.run_id, "model", out.name, "models/" + out.name)
    log.info("registered %s as %s version %s", out.name, tracking.REGISTERED_MODEL, registry_version)
    return {"out_dir": str(out), "metrics": metrics, "mlflow_run_id": run.run_id, "registry_version": registry_version}


def parse_bool(text: str) -> bool:
    """argparse type for a bool field: true/false, yes/no, on/off or 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def arg_type(cls: type, name: str) -> Any:
    """The scalar type of a config dataclass field, for argparse (`int | None` -> int; a bool
    field takes true/false)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if args else hint
    return parse_bool if kind is bool else kind


def add_no_lexical(p: argparse.ArgumentParser) -> None:
    """--no-lexical: the head config's lexical_l2 = None (the CLIs take the head's fields as flags)."""
    p.add_argument(
        "--no-lexical", dest="lexical_l2", action="store_const", const=None,
        help="a head on the embedding alone, without the prompt's word pieces (router.lexical)",
    )


def main(argv: list[str] | None = None) -> int:
    defaults = FitConfig()
    p = argparse.ArgumentParser(prog="python -m training fit", description=__doc__)
    p.add_argument(
        "--datasets",
        default=",".join(defaults.datasets),
        help="comma-separated: mmlu, alpaca_eval, alpaca_eval_binary ('mmlu' alone gives a permissively licensed head)",
    )
    p.add_argument("--no-track", dest="track", action="store_false", help="skip MLflow")
    p.add_argument(
        "--no-set-default",
        dest="set_default",
        action="store_false",
        help="do not point models/DEFAULT at the new version",
    )
    p.add_argument(
        "--cascade-encoder-dir",
        default="",
        help="also fit a cascade's first stage on this encoder's embeddings (e.g. the static one, make model-static)",
    )
    for name in ("data_dir", "encoder_dir", "models_dir", "version", "k_folds", "holdout_fold", *HEAD_FIELDS, "limit"):
        p.add_argument("--" + name.replace("_", "-"), type=arg_type(FitConfig, name), default=getattr(defaults, name))
    add_no_lexical(p)
    args = vars(p.parse_args(argv))
    args["datasets"] = [d for d in args["datasets"].split(",") if d]
    result = fit(FitConfig(**args))
    print(json.dumps(result, indent=2))
    return 0
