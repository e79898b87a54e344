"""`python -m training evaluate`: cross-validated routing figures for a profile's pairs, beside baselines.

Protocols (the model never sees the prompts it is scored on):
  cv        k folds by a hash of the prompt text (copies of a question share a fold)
  subjects  MMLU subjects split into k groups: train on the others, score unseen subjects
  cross     train on one kind of traffic, score another (MMLU -> AlpacaEval and back)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router.lexical import Tokens
from router.profiles import load_profiles
from router.scoring import LENGTH_FEATURES, sigmoid
from training import data as D
from training import evaluate as E
from training.embed import Embedder
from training.fit import (
    DEFAULT_ENCODER,
    REPO,
    add_no_lexical,
    arg_type,
    build_terms,
    calibrate_win,
    closed_probability,
    head_inputs,
    refitter,
    win_probability,
)
from training.model import HEAD_FIELDS, HeadConfig, Terms, WinRateHead

log = logging.getLogger(__name__)

# the routers reported per group and with resampling intervals; the intervals also give the paired
# difference of each of the served rankings (the gain and the floor) minus every other router
COMPARED = ("router_gain", "router_floor", "knn", "prompt_length")

CROSS_SPLITS = {  # name -> (train data sets, scored data sets)
    "mmlu->alpaca": (["mmlu"], ["alpaca_eval_binary", "alpaca_eval"]),
    "alpaca->mmlu": (["alpaca_eval", "alpaca_eval_binary"], ["mmlu"]),
}


@dataclass
class EvalConfig(HeadConfig):
    protocol: str = "cv"  # cv | subjects | cross
    k_folds: int = 5
    datasets: list[str] = field(default_factory=lambda: ["mmlu", "alpaca_eval", "alpaca_eval_binary"])
    profile: str = "routellm-pair"
    profiles_path: str = str(REPO / "config" / "profiles.toml")
    data_dir: str = str(D.DATA_DIR)
    encoder_dir: str = str(DEFAULT_ENCODER)
    max_tokens: int | None = None  # truncate prompts here instead of at the encoder's own max_tokens
    out_dir: str = str(REPO / "build" / "eval")
    knn_k: int = 50
    # a cascade (router.engine): this encoder's head first, the main one where the decision is close
    cascade_encoder_dir: str = ""
    cascade_margins: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])
    limit: int | None = None
    track: bool = True
    bootstrap_draws: int = 200  # resamples of the scored prompts for the APGR intervals; 0: none


@dataclass
class Predictions:
    """Out-of-group head outputs for every scored row."""

    ability: npt.NDArray[np.float32]  # (N, M)
    difficulty: npt.NDArray[np.float32]  # (N,)
    offset: npt.NDArray[np.float32]  # (N, n_datasets) judge offsets of the head that scored the row
    group: npt.NDArray[np.int64]  # (N,) which held-out group scored the row; -1 = not scored
    heads: dict[int, WinRateHead] = field(default_factory=dict)  # the head that scored each group


def groups_for(cfg: EvalConfig, data: D.RoutingData) -> tuple[npt.NDArray[np.int64], list[str]]:
    """Group of each prompt row; each group is held out once. Names describe the groups."""
    if cfg.protocol == "cv":
        return D.folds(data.prompts, cfg.k_folds), [f"fold {k}" for k in range(cfg.k_folds)]
    if cfg.protocol == "subjects":
        subjects = sorted({s for s in data.sources if s.startswith("mmlu/")})
        group_of = {s: D.prompt_fold(s, cfg.k_folds) for s in subjects}
        g = np.array([group_of.get(s, -1) for s in data.sources], np.int64)  # non-MMLU rows: always train
        return g, [f"subjects {k}" for k in range(cfg.k_folds)]
    if cfg.protocol == "cross":
        ds = data.row_dataset()
        g = np.full(data.n_rows, -1, np.int64)
        names = []
        for i, (_, (_, scored)) in enumerate(CROSS_SPLITS.items()):
            names.append(list(CROSS_SPLITS)[i])
            for name in scored:
                if name in data.datasets:
                    g[ds == data.datasets.index(name)] = i
        return g, names
    raise ValueError(f"unknown protocol {cfg.protocol!r}: cv, subjects or cross")


def train_mask(
    cfg: EvalConfig, data: D.RoutingData, terms: Terms, groups: npt.NDArray[np.int64], g: int
) -> npt.NDArray[np.bool_]:
    if cfg.protocol != "cross":
        return groups[terms.row] != g
    train_sets = CROSS_SPLITS[list(CROSS_SPLITS)[g]][0]
    return np.isin(terms.dataset, [data.datasets.index(d) for d in train_sets if d in data.datasets])


def out_of_group(
    cfg: EvalConfig, data: D.RoutingData, X: npt.NDArray[np.float32], terms: Terms, groups: npt.NDArray[np.int64],
    tokens: Tokens,
) -> tuple[Predictions, list[float]]:
    M, n_data = len(data.models), len(data.datasets)
    pred = Predictions(
        np.zeros((data.n_rows, M), np.float32),
        np.zeros(data.n_rows, np.float32),
        np.zeros((data.n_rows, n_data), np.float32),
        np.full(data.n_rows, -1, np.int64),
    )
    losses = []
    for g in sorted(set(groups.tolist()) - {-1}):
        head = cfg.make_head()
        train = train_mask(cfg, data, terms, groups, g)
        head.fit(X, terms.subset(train), tokens)
        refit = refitter(cfg, X, terms.subset(train), tokens)
        calibrate_win(data, head, X, np.unique(terms.row[train]), tokens, refit)
        rows = np.nonzero(groups == g)[0]
        pred.heads[g] = head
        pred.ability[rows], pred.difficulty[rows] = head.logits(X[rows], tokens.take(rows))
        pred.offset[rows] = head.offset_
        pred.group[rows] = g
        losses.append(head.train_loss_)
        log.info(
            "group %d: fitted on %d terms, scored %d prompts",
            g,
            int(train.sum()),
            len(rows),
        )
    return pred, losses


def model_probability(
    data: D.RoutingData, pred: Predictions, rows: npt.NDArray[np.int64], dataset: str, model: str
) -> npt.NDArray[np.float32]:
    """P(outcome = 1) for `model` on `rows`, in `dataset`'s own terms (see training.model)."""
    d = data.datasets.index(dataset)
    if D.FILES[dataset]["compare"] == "bar":
        return sigmoid(pred.ability[rows, data.models.index(model)] - pred.difficulty[rows])
    if model == D.REFERENCE_MODEL:
        return np.full(len(rows), 0.5, np.float32)  # the reference ties with itself
    ref = data.models.index(D.REFERENCE_MODEL)
    return sigmoid(pred.ability[rows, data.models.index(model)] - pred.ability[rows, ref] + pred.offset[rows, d])


def pair_outcomes(
    data: D.RoutingData, dataset: str, weak: str, strong: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """Rows of `dataset` and both models' outcomes there, or None if it lacks one of them."""
    rows, models, mat = data.outcome_matrix(dataset)

    def column(m: str) -> npt.NDArray[np.float64] | None:
        if m in models:
            return mat[:, models.index(m)].astype(np.float64)
        if m == D.REFERENCE_MODEL and D.FILES[dataset]["compare"] == "reference":
            return np.full(len(rows), 0.5)
        return None

    qw, qs = column(weak), column(strong)
    return None if qw is None or qs is None else (rows, qw, qs)


def evaluate_pair(
    cfg: EvalConfig,
    data: D.RoutingData,
    X: npt.NDArray[np.float32],
    pred: Predictions,
    dataset: str,
    weak: str,
    strong: str,
    threshold: float,
    plot_path: Path,
    first: Predictions | None = None,
) -> dict[str, Any] | None:
    found = pair_outcomes(data, dataset, weak, strong)
    if found is None:
        return None
    all_rows, all_qw, all_qs = found  # every labeled row: kNN's neighbours come from these
    rows, q_weak, q_strong = found
    scored = pred.group[rows] >= 0
    rows, q_weak, q_strong = rows[scored], q_weak[scored], q_strong[scored]
    if len(rows) == 0 or np.isclose(q_weak.mean(), q_strong.mean()):
        return None
    p_weak = model_probability(data, pred, rows, dataset, weak).astype(np.float64)
    p_strong = model_probability(data, pred, rows, dataset, strong).astype(np.float64)
    win = np.zeros(len(rows))
    diff = pred.ability[rows, data.models.index(strong)] - pred.ability[rows, data.models.index(weak)]
    for g in np.unique(pred.group[rows]):  # as served: each group's head with its own calibration
        sel = pred.group[rows] == g
        head = pred.heads[int(g)]
        win[sel] = win_probability(head, strong, weak, diff[sel], closed_probability(head, X[rows[sel]]))
    lengths = np.array([len(data.prompts[r]) for r in rows], np.float64)

    emb = X[:, : X.shape[1] - len(LENGTH_FEATURES)]  # kNN: cosine on the embedding alone
    # kNN on the same embeddings, fitted per held-out group on the pair's other rows
    knn = np.zeros(len(rows))
    for g in np.unique(pred.group[rows]):
        test = pred.group[rows] == g
        if cfg.protocol == "cross":  # neighbours come from the training traffic
            src = [d for d in CROSS_SPLITS[list(CROSS_SPLITS)[g]][0] if d in data.datasets]
            tr_rows, tr_gain = [], []
            for d in src:
                f = pair_outcomes(data, d, weak, strong)
                if f is not None:
                    tr_rows.append(f[0])
                    tr_gain.append(f[2] - f[1])
            if not tr_rows:
                continue
            tr, gain = np.concatenate(tr_rows), np.concatenate(tr_gain)
        else:
            keep = pred.group[all_rows] != g
            tr, gain = all_rows[keep], (all_qs - all_qw)[keep]
        knn[test] = E.knn_gain(emb[tr], gain, emb[rows[test]], cfg.knn_k)

    scores: dict[str, npt.NDArray[np.float64]] = {
        "router_gain": p_strong - p_weak,
        "router_floor": 1.0 - p_weak,
        "router_win": win.astype(np.float64),
    }
    # a candidate, not served: both estimate the same expected gain, so their mean is one too
    scores |= {"knn": knn, "gain_knn_mean": 0.5 * (scores["router_gain"] + knn)}
    scores |= E.baseline_scores(q_weak, q_strong, lengths, cfg.seed)
    w, st = data.models.index(weak), data.models.index(strong)
    q_main = sigmoid(pred.ability[rows, w] - pred.difficulty[rows]).astype(np.float64)  # as served
    gain_main = sigmoid(pred.ability[rows, st] - pred.difficulty[rows]).astype(np.float64) - q_main
    # router_floor above is P(weak's outcome) in the data set's own terms (for AlpacaEval: against
    # the reference, with the judge's offset); serving's floor rule reads the tier quality instead
    scores["served_floor"] = 1.0 - q_main
    if first is not None:
        q_first = sigmoid(first.ability[rows, w] - first.difficulty[rows]).astype(np.float64)
        gain_first = sigmoid(first.ability[rows, st] - first.difficulty[rows]).astype(np.float64) - q_first
        scores["first_stage_floor"] = 1.0 - q_first
        scores["first_stage_gain"] = gain_first
    curves = {name: E.routed_quality(s, q_weak, q_strong) for name, s in scores.items()}
    curves["random"] = E.random_curve(q_weak, q_strong, seed=cfg.seed)
    cascade = {}
    if first is not None:
        # the main stage alone, swept over the same grid: checks the sweep against served_floor / _gain
        curves["floor_sweep"] = E.cascade_curve(1 - q_first, 1 - q_main, q_weak, q_strong, band=9.0)[0]
        curves["gain_sweep"] = E.cascade_curve(gain_first, gain_main, q_weak, q_strong, band=9.0)[0]
        for m in cfg.cascade_margins:
            curves[f"cascade_floor_{m:g}"], floor_main = E.cascade_curve(1 - q_first, 1 - q_main, q_weak, q_strong, m)
            curves[f"cascade_gain_{m:g}"], gain_share = E.cascade_curve(gain_first, gain_main, q_weak, q_strong, 2 * m)
            sure = E.floor_settled(q_first, threshold, m)
            to_strong = np.where(sure, q_first < threshold, q_main < threshold)
            cascade[f"cascade_{m:g}"] = {
                "margin": m,
                "floor_main_share_mean": float(floor_main.mean()),  # over strong-call shares 0..100 %
                "gain_main_share_mean": float(gain_share.mean()),
                "main_share_at_threshold": float(1.0 - sure.mean()),
                "quality_at_threshold": float(np.where(to_strong, q_strong, q_weak).mean()),
                "strong_share_at_threshold": float(to_strong.mean()),
            }
    figures = {
        name: {
            "apgr": E.apgr(c, q_weak, q_strong),
            "cpt50": E.cpt(c, q_weak, q_strong, 0.5),
            "cpt80": E.cpt(c, q_weak, q_strong, 0.8),
        }
        for name, c in curves.items()
    }
    bootstrap = E.bootstrap_apgr(
        {name: scores[name] for name in COMPARED}, q_weak, q_strong, COMPARED[:2], cfg.bootstrap_draws, cfg.seed
    ) if cfg.bootstrap_draws else {}
    per_group = {}
    for g in np.unique(pred.group[rows]):
        sel = pred.group[rows] == g
        if np.isclose(q_weak[sel].mean(), q_strong[sel].mean()):
            continue
        per_group[int(g)] = {
            name: E.router_figures(s[sel], q_weak[sel], q_strong[sel])["apgr"]
            for name, s in scores.items()
            if name in COMPARED
        }
    pairwise = np.where(q_strong > q_weak, 1.0, np.where(q_strong < q_weak, 0.0, 0.5))
    calibration = {
        "weak_quality": {"ece": E.expected_calibration_error(p_weak, q_weak), "brier": E.brier(p_weak, q_weak)},
        "win_probability": {"ece": E.expected_calibration_error(win, pairwise), "brier": E.brier(win, pairwise)},
    }
    if strong != D.REFERENCE_MODEL or D.FILES[dataset]["compare"] == "bar":
        calibration["strong_quality"] = {
            "ece": E.expected_calibration_error(p_strong, q_strong),
            "brier": E.brier(p_strong, q_strong),
        }
    E.plot_curves(
        curves, q_weak, q_strong, f"{dataset}: {weak} -> {strong} ({cfg.protocol}, {len(rows)} prompts)", str(plot_path)
    )
    return {
        "dataset": dataset,
        "weak": weak,
        "strong": strong,
        "prompts": int(len(rows)),
        "weak_mean": float(q_weak.mean()),
        "strong_mean": float(q_strong.mean()),
        "routers": figures,
        "per_group_apgr": per_group,
        "bootstrap": bootstrap,
        "calibration": calibration,
        "cascade": cascade,
        # serving's floor rule reads the weak tier's quality as served: sigmoid(ability - difficulty)
        "at_profile_threshold": E.quality_at_threshold(
            q_main,
            q_weak,
            q_strong,
            threshold,
        ),
        "plot": plot_path.name,
    }


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    # 1. data, terms, embeddings through the serving encoder
    data = D.load(cfg.datasets, Path(cfg.data_dir), cfg.limit)
    terms = build_terms(data)
    enc = Path(cfg.encoder_dir)
    meta = json.loads((enc / "encoder.json").read_text("utf-8"))
    max_tokens = cfg.max_tokens or int(meta["max_tokens"])
    embedder = Embedder(enc / "encoder.onnx", enc / "tokenizer.json", max_tokens)
    X = head_inputs(embedder.embed(data.prompts), data.prompts)

    # 2. out-of-group predictions: every scored prompt comes from a head that never saw it
    groups, group_names = groups_for(cfg, data)
    pred, _ = out_of_group(cfg, data, X, terms, groups, embedder.tokens(data.prompts))
    first, first_meta = None, None
    if cfg.cascade_encoder_dir:  # the cascade's first stage: its own heads on the same groups
        fenc = Path(cfg.cascade_encoder_dir)
        first_meta = json.loads((fenc / "encoder.json").read_text("utf-8"))
        fembedder = Embedder(fenc / "encoder.onnx", fenc / "tokenizer.json", int(first_meta["max_tokens"]))
        fX = head_inputs(fembedder.embed(data.prompts), data.prompts)
        first, _ = out_of_group(cfg, data, fX, terms, groups, fembedder.tokens(data.prompts))

    # 3. figures for each adjacent pair of the profile's tiers, on every data set that labels it
    profile = load_profiles(Path(cfg.profiles_path))[cfg.profile]
    out_dir = Path(cfg.out_dir) / f"{cfg.protocol}-{cfg.profile}"
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for weak, strong in zip(profile.tiers, profile.tiers[1:], strict=False):
        for dataset in cfg.datasets:
            res = evaluate_pair(
                cfg,
                data,
                X,
                pred,
                dataset,
                weak.model,
                strong.model,
                profile.floor,
                out_dir / f"curve-{dataset}-{weak.name}-{strong.name}.png",
                first,
            )
            if res is not None:
                pairs.append(res | {"tiers": f"{weak.name}->{strong.name}"})
    result = {
        "config": asdict(cfg),
        "groups": group_names,
        "pairs": pairs,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "encoder_sha256": meta["sha256"],
        "encoder": {"name": meta["name"], "dim": meta["dim"], "max_tokens": max_tokens},
        **({"cascade_encoder": {"name": first_meta["name"], "sha256": first_meta["sha256"]}} if first_meta else {}),
        "data": data.files,
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    if cfg.track:
        from training import tracking

        with tracking.run(f"evaluate-{cfg.protocol}-{cfg.profile}", asdict(cfg), {"kind": "evaluate"}) as run:
            run.log_metrics(
                {
                    f"{p['dataset']}.{p['tiers']}": {"routers": p["routers"], "calibration": p["calibration"]}
                    for p in pairs
                }
            )
            run.log_artifact(out_dir)
    return result


def table(result: dict[str, Any]) -> str:
    lines = []
    for p in result["pairs"]:
        lines.append(
            f"\n{p['dataset']}  {p['tiers']}  ({p['weak']} {p['weak_mean']:.3f} -> "
            f"{p['strong']} {p['strong_mean']:.3f}, {p['prompts']} prompts)"
        )
        lines.append(f"  {'router':<20}{'APGR':>7}{'CPT50':>8}{'CPT80':>8}")
        for name, f in p["routers"].items():
            lines.append(f"  {name:<20}{f['apgr']:>7.3f}{f['cpt50'] * 100:>7.0f}%{f['cpt80'] * 100:>7.0f}%")
        if p.get("bootstrap"):
            b = p["bootstrap"]
            lines.append("  95 % intervals over resampled prompts, APGR: " + ", ".join(
                f"{k} {v[0]:.3f}-{v[2]:.3f}" for k, v in b["apgr"].items()))
            for key, diffs in b.items():
                if key != "apgr":
                    lines.append(f"    {key.replace('_minus', ' minus')}: " + ", ".join(
                        f"{k} {v[0]:+.3f}..{v[2]:+.3f}" for k, v in diffs.items()))
        cal = "  ".join(f"{k} ECE {v['ece']:.3f}" for k, v in p["calibration"].items())
        t = p["at_profile_threshold"]
        lines.append(f"  calibration: {cal}")
        lines.append(
            f"  at threshold {t['threshold']}: {t['strong_share'] * 100:.1f}% strong, quality {t['quality']:.4f}"
        )
        for name, c in p.get("cascade", {}).items():
            lines.append(
                f"  {name}: main encoder on {c['floor_main_share_mean'] * 100:.1f}% (floor) / "
                f"{c['gain_main_share_mean'] * 100:.1f}% (gain) of calls over the curve, "
                f"{c['main_share_at_threshold'] * 100:.1f}% at threshold {t['threshold']} "
                f"(quality {c['quality_at_threshold']:.4f}, {c['strong_share_at_threshold'] * 100:.1f}% strong)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = EvalConfig()
    p = argparse.ArgumentParser(
        prog="python -m training evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--datasets", default=",".join(defaults.datasets))
    p.add_argument("--no-track", dest="track", action="store_false", help="skip MLflow")
    p.add_argument(
        "--cascade-margins",
        default=",".join(f"{m:g}" for m in defaults.cascade_margins),
        help="with --cascade-encoder-dir: the margins to score the cascade at",
    )
    for name in (
        "protocol",
        "k_folds",
        "profile",
        "profiles_path",
        "data_dir",
        "encoder_dir",
        "max_tokens",
        "out_dir",
        *HEAD_FIELDS,
        "knn_k",
        "cascade_encoder_dir",
        "limit",
        "bootstrap_draws",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=arg_type(EvalConfig, name), default=getattr(defaults, name))
    add_no_lexical(p)
    args = vars(p.parse_args(argv))
    args["datasets"] = [d for d in args["datasets"].split(",") if d]
    args["cascade_margins"] = [float(m) for m in args["cascade_margins"].split(",") if m]
    result = evaluate(EvalConfig(**args))
    print(table(result))
    cfg = result["config"]
    print("\nwritten:", Path(cfg["out_dir"]) / f"{cfg['protocol']}-{cfg['profile']}")
    return 0
