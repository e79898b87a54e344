"""`python -m training calibrate`: a profile's target -> the parameters that meet it on the deployment's own prompts.

    python -m training calibrate --profile NAME --prompts FILE [--share TIER=FRAC ... | --budget USD_PER_1K
                                 | --floor F | --rework-cost USD] [--write]

1. read the prompts: JSON Lines (gzip allowed), one object per line with a "prompt" string or
   chat "messages" ([{role, content}], joined as the server joins them); the shared data files
   work as they are. Optional "workflow", "stage" and "tenant" keys reach the profile's rules.
2. score them through the serving model (models/<version>/: same tokenizer, encoder, head): per
   tier the predicted quality (N, T), and the expected cost (N, T) from the prompt's tokens, the
   profile's expected_output_tokens and the tiers' prices.
3. calibrate with router.scoring, the math that serves:
     share   all tiers' shares -> per-tier `floors` (share_floors); the last tier's share only ->
             one common floor (top_share_floor)
     budget  USD per 1,000 requests -> `budget_lambda`, the price of quality (budget_lambda)
     floor, rework  nothing to fit
4. report what the calibrated profile does on these prompts (router.policy.decide): tier shares,
   mean predicted quality of the chosen tier, cost per 1,000 requests, beside always sending
   everything to one tier; and plot the trade-off curve as the floor sweeps 0..1.
5. --write: the parameters and a `calibrated` record into the profiles file (tomlkit keeps
   comments and layout), replaced atomically (a running server reloads it), and loaded again to
   prove it is valid.

`python -m training cost-table` (cost_table_main) measures the same on the shared data's held-out
fold, with the data's real labels beside the predicted quality (docs/evaluation.md).

Costs are expected costs: input tokens as counted by the serving tokenizer (word pieces, a proxy
for the provider's tokens), output tokens = the profile's expected_output_tokens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import logging
import os
import shutil
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from router import scoring as S
from router.artifacts import ArtifactError, LoadedModel, Stage, load_model
from router.engine import RoutingEngine
from router.policy import RequestContext, decide, settled_within
from router.profiles import Profile, ProfileError, catalog_path, load_prices, load_profiles, priced
from router.tokenizer import Keep
from training import data as D
from training.embed import CACHE_DIR, cache_file, read_cache, text_key, write_cache

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "config" / "profiles.toml"
MODELS = REPO / "models"
OUT = REPO / "build" / "calibrate"
FLOOR_SWEEP = np.linspace(0.0, 1.0, 101)
LAMBDA_SWEEP = np.geomspace(1e-4, 10.0, 81)  # price of quality per USD per 1,000 requests (choose_budget)
EXIT_UNREACHABLE = 2


# -- 1. prompts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """The traffic to calibrate on, as the server would see it."""

    texts: list[str]
    keep: list[Keep]  # "head" for a prompt, "tail" for a chat transcript (router.tokenizer)
    contexts: list[RequestContext]
    files: list[str]  # where they came from, for the record
    # From the decision log: the logged embeddings, lengths and token counts (texts are empty
    # unless the profile stored prompts), so nothing is embedded again.
    embedding: npt.NDArray[np.float32] | None = None
    chars: npt.NDArray[np.float32] | None = None
    input_tokens: npt.NDArray[np.int64] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, mask: npt.NDArray[np.bool_]) -> Prompts:
        idx = np.flatnonzero(mask)
        pick = (lambda a: None if a is None else a[idx])  # noqa: E731
        return Prompts(
            [self.texts[i] for i in idx], [self.keep[i] for i in idx], [self.contexts[i] for i in idx], self.files,
            pick(self.embedding), pick(self.chars), pick(self.input_tokens),
        )


def read_log(
    url: str, profile: str | None = None, days: float | None = None, limit: int | None = None,
    encoder: str | None = None, first_stage: str | None = None,
) -> tuple[Prompts, Prompts | None]:
    """The traffic a server logged (router.decisionlog): every decision, or those of one profile,
    of the last `days`, the newest `limit`. Prompts are not in the log unless the profile stored
    them, so rules on prompt text see an empty prompt here. With `encoder`, the decisions whose
    embedding that encoder made; with `first_stage` (a cascade's first-stage encoder), its
    decisions apart, as the second item (None without one). Others are left out, with a warning."""
    from router.decisionlog import DecisionLog

    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=days) if days is not None else None
    with DecisionLog(url) as dlog:
        rows = [r for r in dlog.iter_decisions(since) if profile is None or r.profile == profile]
    rows = rows[-limit:] if limit is not None else rows
    if not rows:
        raise ValueError(f"{url}: no logged decisions" + (f" of profile {profile!r}" if profile else ""))
    what = f"decision log ({len(rows)} decisions" + (f" of profile {profile}" if profile else "") + ")"
    if encoder is None:
        return _logged(rows, what), None
    mine = [r for r in rows if r.encoder in ("", encoder)]
    first = [r for r in rows if first_stage is not None and r.encoder == first_stage]
    if len(mine) + len(first) < len(rows):
        log.warning("%d of %d logged decisions were embedded by neither stage of this version and are left out",
                    len(rows) - len(mine) - len(first), len(rows))  # fmt: skip
    if not mine and not first:
        raise ValueError(f"{url}: no logged decisions of this version's encoders")
    return _logged(mine, what), _logged(first, what) if first else None


def _logged(rows: Sequence[Any], what: str) -> Prompts:
    """Prompts (with their logged embeddings, lengths and token counts) from decision-log rows."""
    from router.decisionlog import decode_embedding

    return Prompts(
        texts=[r.prompt or "" for r in rows], keep=["head"] * len(rows),
        contexts=[RequestContext(workflow=r.workflow, tenant=r.tenant) for r in rows],
        files=[what],
        embedding=np.stack([decode_embedding(r.embedding) for r in rows]) if rows else None,
        chars=np.array([r.prompt_chars for r in rows], np.float32),
        input_tokens=np.array([r.input_tokens for r in rows], np.int64),
    )


def _line_text(obj: dict[str, Any], where: str) -> tuple[str, Keep]:
    """Like router.service.request_text: a prompt keeps its head, a transcript its tail."""
    if isinstance(obj.get("prompt"), str):
        if not obj["prompt"].strip():
            raise ValueError(f"{where}: prompt is empty")
        return obj["prompt"], "head"
    messages = obj.get("messages")
    if isinstance(messages, list):
        text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict) and m.get("content"))
        if not text.strip():
            raise ValueError(f"{where}: every message content is empty")
        return text, "tail"
    raise ValueError(f'{where}: needs a "prompt" string or a "messages" list')


def read_prompts(
    paths: Sequence[Path], exclude_fold: int | None = None, k_folds: int = 10, limit: int | None = None,
    only_fold: int | None = None,
) -> Prompts:
    """Prompts from JSONL files (gzip by suffix). exclude_fold leaves out the prompts in that fold
    of k_folds by prompt hash (training.data.prompt_fold), e.g. the model's held-out fold;
    only_fold keeps that fold alone."""
    texts: list[str] = []
    keep: list[Keep] = []
    contexts: list[RequestContext] = []
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{i}: each line must be a JSON object")
                text, side = _line_text(obj, f"{path}:{i}")
                if exclude_fold is not None or only_fold is not None:
                    fold = D.prompt_fold(text, k_folds)
                    if fold == exclude_fold or (only_fold is not None and fold != only_fold):
                        continue
                texts.append(text)
                keep.append(side)
                contexts.append(
                    RequestContext(
                        workflow=str(obj.get("workflow", "")),
                        stage=str(obj.get("stage", "")),
                        tenant=str(obj.get("tenant", "")),
                    )
                )
                if limit is not None and len(texts) >= limit:
                    break
    names = [p.name for p in paths]
    if exclude_fold is not None:
        names.append(f"without fold {exclude_fold} of {k_folds}")
    if only_fold is not None:
        names.append(f"fold {only_fold} of {k_folds} only")
    return Prompts(texts, keep, contexts, names)


# -- 2. scoring through the serving model -----------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Per prompt and tier of one profile: predicted quality and expected cost."""

    quality: S.FloatArray  # (N, T) P(acceptable answer), router.scoring.tier_quality
    cost: npt.NDArray[np.float64]  # (N, T) expected USD per request
    input_tokens: npt.NDArray[np.int64]  # (N,) word pieces of the whole prompt
    model_version: str

    def subset(self, mask: npt.NDArray[np.bool_]) -> Scored:
        return Scored(self.quality[mask], self.cost[mask], self.input_tokens[mask], self.model_version)


def embed(
    engine: RoutingEngine, prompts: Prompts, cache_dir: Path | None = CACHE_DIR, stage: Stage | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Embeddings (N, dim) and whole-prompt token counts (N,), through RoutingEngine.embed.

    With cache_dir, prompts (head-truncated) already in training.embed's cache for this encoder
    (same encoder sha256 and max_tokens; `training fit` fills it for the shared data) are taken
    from there, and the ones embedded here are added to it. Chat transcripts keep their tail, so
    they are never cached."""
    stage = stage or engine.main
    enc = stage.encoder_spec
    full = stage.tokenizer.encode(prompts.texts, prompts.keep).full_lengths
    out = np.empty((len(prompts), enc.dim), np.float32)
    cache_path = cache_file(cache_dir, enc.sha256, enc.max_tokens) if cache_dir is not None else None
    cache = read_cache(cache_path) if cache_path is not None else {}
    keys = [text_key(t) if k == "head" else b"" for t, k in zip(prompts.texts, prompts.keep, strict=True)]
    todo = []
    for i, key in enumerate(keys):
        if key in cache:
            out[i] = cache[key]
        else:
            todo.append(i)
    log.info("%d of %d prompts embedded already (cache), embedding %d", len(prompts) - len(todo), len(prompts),
             len(todo))
    for n, i in enumerate(todo, 1):  # one per run, as training.embed.Embedder and a quiet server do
        out[i] = engine.embed([prompts.texts[i]], [prompts.keep[i]], stage)[0][0]
        if n % 2000 == 0:
            log.info("embedded %d of %d prompts", n, len(todo))
    new = {keys[i]: out[i] for i in todo if keys[i]}
    if cache_path is not None and new:
        write_cache(cache_path, cache | new)
    return out, full


def score(
    engine: RoutingEngine, profile: Profile, prompts: Prompts, cache_dir: Path | None = CACHE_DIR,
    stage: Stage | None = None,
) -> Scored:
    """Per-tier quality and cost through the main stage, or through `stage` (a cascade's first).
    Logged traffic comes embedded already, by that stage's encoder (read_log)."""
    if prompts.embedding is not None and prompts.chars is not None and prompts.input_tokens is not None:
        embedding, input_tokens, chars = prompts.embedding, prompts.input_tokens, prompts.chars
    else:
        embedding, input_tokens = embed(engine, prompts, cache_dir, stage)
        chars = np.fromiter((len(t) for t in prompts.texts), np.float32, len(prompts))
    lexical = engine.lexical(prompts.texts, prompts.keep, stage)
    if lexical is not None and prompts.embedding is not None and not any(prompts.texts):
        log.warning("the head reads the prompts' words, but the log kept no prompt texts: scoring without them")
    ability, difficulty = engine.score(embedding, chars, stage, lexical)
    quality = S.tier_quality(ability[:, engine.columns(profile)], difficulty)  # (N, T)
    price_in, price_out = profile.prices
    out_tokens = np.full(len(prompts), profile.expected_output_tokens, np.int64)
    cost = S.expected_cost(input_tokens, out_tokens, price_in, price_out)  # (N, T)
    return Scored(quality, cost, input_tokens, engine.version)


# -- 3. calibration -----------------------------------------------------------------------------


def _round(x: float, up: bool = False) -> float:
    """Six significant digits for the file; `up` never rounds below x (a budget's lambda: a
    smaller one spends more)."""
    if not np.isfinite(x) or x == 0.0:
        return x
    r = float(f"{x:.6g}")
    if up and r < x:
        r = float(f"{r + 10.0 ** (np.floor(np.log10(abs(x))) - 5):.6g}")
    return r


def calibrate(profile: Profile, scored: Scored) -> dict[str, Any]:
    """The profile fields that meet its target on these prompts (empty for floor and rework).
    Raises router.scoring.UnreachableTarget."""
    q = scored.quality
    if profile.mode == "share":
        assert profile.shares, "a share profile has shares (validated). This is a bug."
        targets = profile.share_targets()
        if targets is not None:
            floors = [float(f) for f in S.share_floors(q, targets)]
        else:
            f = S.top_share_floor(q, profile.shares[profile.tier_names[-1]])
            floors = [f] * (len(profile.tiers) - 1) + [0.0]  # the last tier takes what no cheaper one clears
        return {"floors": [_round(f) for f in floors]}
    if profile.mode == "budget":
        assert profile.budget_per_1k is not None, "validated. This is a bug."
        try:
            lam = S.budget_lambda(q, scored.cost, profile.budget_per_1k)
        except S.UnreachableTarget as e:
            raise S.UnreachableTarget(f"profiles.{profile.name}.budget_per_1k: unreachable target: {e}") from None
        return {"budget_lambda": _round(lam, up=True)}
    return {}


def with_fields(profile: Profile, fields: dict[str, Any]) -> Profile:
    """The profile with `fields` replaced, validated again (prices stay filled in)."""
    body = profile.model_dump() | fields
    try:
        return Profile.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"profiles.{profile.name}{'.' + loc if loc else ''}: {err['msg']}") from None


# -- 4. what a profile does on the prompts --------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    tier_index: npt.NDArray[np.int64]  # (N,) -1: a pinned model outside the tiers
    shares: list[float]  # per tier
    quality: float  # mean predicted quality of the chosen tier
    cost_per_1k: float  # USD per 1,000 requests


def outcome(profile: Profile, scored: Scored, prompts: Prompts) -> Outcome:
    """Decisions exactly as the server makes them (rules included, no exploration)."""
    decided = decide(profile, scored.quality, scored.input_tokens, prompts.texts, prompts.contexts)
    idx = np.array([c.tier_index for c in decided.choices], np.int64)
    return Outcome(
        idx,
        [float(np.mean(idx == k)) for k in range(len(profile.tiers))],
        float(np.mean([c.confidence for c in decided.choices])),
        float(np.mean([c.cost for c in decided.choices]) * 1000.0),
    )


def always(scored: Scored, k: int) -> tuple[float, float]:
    """(mean predicted quality, cost per 1,000 requests) of sending everything to tier k."""
    return float(scored.quality[:, k].mean()), float(scored.cost[:, k].mean() * 1000.0)


def sweep(scored: Scored) -> dict[str, list[list[float]]]:
    """The trade-off curves: (cost per 1,000, mean predicted quality) as the floor sweeps 0..1
    (mode floor) and as the price of quality sweeps (modes budget and rework trace one curve)."""
    q, c = scored.quality, scored.cost
    rows = np.arange(len(q))
    allowed = np.ones(q.shape, bool)
    floor_curve, lam_curve = [], []
    for f in FLOOR_SWEEP:
        idx, _ = S.choose_floor(q, float(f), allowed)
        floor_curve.append([float(f), float(c[rows, idx].mean() * 1000), float(q[rows, idx].mean())])
    for lam in LAMBDA_SWEEP:
        idx = S.choose_budget(q, c, float(lam), allowed)
        lam_curve.append([float(lam), float(c[rows, idx].mean() * 1000), float(q[rows, idx].mean())])
    return {"floor": floor_curve, "price_of_quality": lam_curve}


def plot(profile: Profile, curves: dict[str, list[list[float]]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    fl = np.array(curves["floor"])
    ax.plot(fl[:, 1], fl[:, 2], "-", lw=2, label="floor 0..1 (mode floor, share)")
    for f in (0.3, 0.5, 0.7):
        i = int(np.argmin(np.abs(fl[:, 0] - f)))
        ax.plot(fl[i, 1], fl[i, 2], ".", color="C0")
        ax.annotate(f"floor {f}", (fl[i, 1], fl[i, 2]), fontsize=7, textcoords="offset points", xytext=(4, -10))
    lam = np.array(curves["price_of_quality"])
    ax.plot(lam[:, 1], lam[:, 2], "--", lw=1.2, label="price of quality (mode budget, rework)")
    for name, b in result["always"].items():
        ax.plot(b["cost_per_1k"], b["quality"], "s", color="grey")
        ax.annotate(f"always {name}", (b["cost_per_1k"], b["quality"]), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
    r = result["result"]
    ax.plot(r["cost_per_1k"], r["quality"], "*", ms=14, color="crimson", label=f"this profile ({profile.mode})")
    ax.set_xlabel("expected cost per 1,000 requests (USD)")
    ax.set_ylabel("mean predicted quality of the chosen tier")
    ax.set_title(f"{profile.name}: {result['n']} prompts, model {result['model_version']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def target_text(profile: Profile) -> str:
    if profile.mode == "share":
        return "shares " + ", ".join(f"{k} {v:.0%}" for k, v in (profile.shares or {}).items())
    if profile.mode == "budget":
        return f"budget {profile.budget_per_1k} USD per 1,000 requests"
    if profile.mode == "rework":
        return f"rework cost {profile.rework_cost} USD"
    return f"floor {profile.floor}"


def table(profile: Profile, result: dict[str, Any]) -> str:
    names = profile.tier_names
    head = f"  {'':<22}" + "".join(f"{n:>10}" for n in names) + f"{'quality':>10}{'USD/1k':>10}"
    lines = [f"{profile.name} ({target_text(profile)}) on {result['n']} prompts, model {result['model_version']}",
             head]
    r = result["result"]
    lines.append(f"  {'routed':<22}" + "".join(f"{s:>10.1%}" for s in r["shares"])
                 + f"{r['quality']:>10.4f}{r['cost_per_1k']:>10.3f}")
    for k, (name, b) in enumerate(result["always"].items()):
        shares = "".join(f"{(1.0 if j == k else 0.0):>10.0%}" for j in range(len(names)))
        lines.append(f"  {'always ' + name:<22}{shares}{b['quality']:>10.4f}{b['cost_per_1k']:>10.3f}")
    if result["parameters"]:
        lines.append("  parameters: " + ", ".join(f"{k} = {v}" for k, v in result["parameters"].items()))
    if (c := result.get("cascade")) and c.get("as_logged"):
        lines.append(f"  cascade: each logged decision scored by the stage that made it (the main encoder "
                     f"{c['main_share']:.1%}, the first stage the rest)")
    elif c:
        lines.append(f"  cascade (margin {c['margin']}): decided as served, the main encoder on "
                     f"{c['main_share']:.1%} of prompts, the first stage on the rest")
    lines.append("  quality: the head's predicted P(acceptable answer) of the chosen tier; USD/1k: expected cost "
                 f"with {profile.expected_output_tokens} output tokens")
    return "\n".join(lines)


# -- 5. writing the profile ---------------------------------------------------------------------


MODE_COMMENTS = {
    "floor": "the cheapest tier whose predicted quality clears `floor`",
    "share": "per-tier floors calibrated to meet `shares` (python -m training calibrate)",
    "budget": "maximize quality - budget_lambda x cost, calibrated to meet budget_per_1k",
    "rework": "minimize list price + P(failure) x rework_cost",
}


def _toml_value(value: Any) -> Any:
    import tomlkit

    if isinstance(value, dict):
        t = tomlkit.inline_table()
        t.update({k: _toml_value(v) for k, v in value.items()})
        return t
    if isinstance(value, list | tuple):
        a = tomlkit.array()
        a.extend(_toml_value(v) for v in value)
        return a
    return value


def write_profile(path: Path, name: str, fields: dict[str, Any]) -> str | None:
    """Set `fields` on [profiles.<name>] in place: comments and layout elsewhere survive; the new
    file must load (router.profiles.load_profiles) before it replaces the old one, atomically.
    Returns a warning when the file did not load before and still does not (see _check_written)."""
    import tomlkit

    doc = tomlkit.parse(path.read_text("utf-8"))
    try:
        table = doc["profiles"][name]  # type: ignore[index]
    except KeyError:
        raise ProfileError(f"{path}: profiles.{name}: no such profile") from None
    for key, value in fields.items():
        if key == "mode" and table.get("mode") != value:  # type: ignore[union-attr]
            item = tomlkit.string(value)
            item.comment(MODE_COMMENTS[value])
            if "mode" in table:  # keep the comment's column
                old = table.item("mode")  # type: ignore[union-attr]
                pad = len(old.as_string()) + len(old.trivia.comment_ws) - len(item.as_string())
                item.trivia.comment_ws = " " * max(pad, 1)
            table[key] = item  # type: ignore[index]
        else:
            table[key] = _toml_value(value)  # type: ignore[index]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the catalog path resolves alike
    tmp.write_text(tomlkit.dumps(doc), "utf-8")
    try:
        shutil.copymode(path, tmp)
        warning = _check_written(tmp, path, name)
    except ProfileError as e:
        tmp.unlink()
        raise ProfileError(f"{path}: not written, the result would not load: {str(e).replace(str(tmp), str(path))}") \
            from None
    os.replace(tmp, path)
    if warning is None:
        load_profiles(path)  # what is on disk now loads (a concurrent edit would show here)
    return warning


def _check_written(new: Path, old: Path, name: str) -> str | None:
    """None when the new file loads. When it does not, the edit is still accepted if the profile it
    wrote is valid on its own and the old file did not load either (another profile's error, e.g.
    one not calibrated yet); the returned warning names that error. Else ProfileError."""
    try:
        load_profiles(new)
        return None
    except ProfileError as e:
        error = e
    load_target(new, name, {}, placeholders=False)
    try:
        load_profiles(old)
    except ProfileError:
        why = str(error).replace(str(new), str(old))
        return f"{old} still does not load, for a reason this edit did not add: {why}"
    raise error


# -- the command --------------------------------------------------------------------------------


def load_target(path: Path, name: str, overrides: dict[str, Any], placeholders: bool = True) -> Profile:
    """One profile of the file, priced, with command-line overrides. With `placeholders`, a profile
    that has never been calibrated (mode share without floors, budget without budget_lambda) loads."""
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profiles file: {e}") from e
    tables = doc.get("profiles") or {}
    if name not in tables:
        raise ProfileError(f"{path}: profiles.{name}: no such profile; defined: {sorted(tables)}")
    body = dict(tables[name]) | overrides
    tiers = body.get("tiers") or []
    if placeholders and body.get("mode") == "share" and (body.get("floors") is None
                                                          or len(body["floors"]) != len(tiers)):
        body["floors"] = [0.0] * len(tiers)
    if placeholders and body.get("mode") == "budget" and body.get("budget_lambda") is None:
        body["budget_lambda"] = 0.0
    try:
        profile = Profile(name=name, **body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"{path}: profiles.{name}{'.' + loc if loc else ''}: {err['msg']}") from None
    prices_path = catalog_path(path, doc)
    return priced(path, profile, load_prices(prices_path) if prices_path is not None else {})


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    if args.share:
        shares = {}
        for item in args.share:
            tier, sep, frac = item.partition("=")
            if not sep:
                raise ProfileError(f"--share {item}: expected TIER=FRACTION, e.g. frontier=0.2")
            try:
                shares[tier] = float(frac)
            except ValueError:
                raise ProfileError(f"--share {item}: {frac!r} is not a number") from None
        return {"mode": "share", "shares": shares}
    if args.budget is not None:
        return {"mode": "budget", "budget_per_1k": args.budget}
    if args.floor is not None:
        return {"mode": "floor", "floor": args.floor}
    if args.rework_cost is not None:
        return {"mode": "rework", "rework_cost": args.rework_cost}
    return {}


def _bisect(fn: Callable[[float], float], lo: float, hi: float, target: float, *, increasing: bool,
            steps: int = 40) -> float:
    """The x in [lo, hi] where fn (monotone, up to sampling) crosses `target`: the smallest x with
    fn(x) >= target when increasing, the smallest x with fn(x) <= target when decreasing."""
    for _ in range(steps):
        mid = (lo + hi) / 2.0
        reached = fn(mid) >= target if increasing else fn(mid) <= target
        lo, hi = (lo, mid) if reached else (mid, hi)
    return hi


def _halfway(a: Any, b: Any) -> Any:
    """The midpoint of two calibrated values (a float or a list of floats), to six significant
    digits like calibrate()'s."""
    if isinstance(a, list):
        return [_halfway(x, y) for x, y in zip(a, b, strict=True)]
    return _round((a + b) / 2.0)


@dataclass(frozen=True)
class Cascaded:
    """A profile with cascade_margin on a version with a first stage: which stage's scores decide
    each prompt depends on the profile's own floors or budget, so calibration iterates."""

    main: Scored
    first: Scored
    prompts: Prompts
    rounds: int = 30

    def settled(self, profile: Profile) -> npt.NDArray[np.bool_]:
        return settled_within(float(profile.cascade_margin or 0.0), profile, self.first.quality,
                              self.first.input_tokens, self.prompts.texts, self.prompts.contexts)

    def as_served(self, profile: Profile, sure: npt.NDArray[np.bool_] | None = None) -> Scored:
        """Per prompt, the scores of the stage that decides it under `profile` (`sure`: its
        settled(profile), when the caller has it already)."""
        sure = self.settled(profile) if sure is None else sure
        return Scored(
            np.where(sure[:, None], self.first.quality, self.main.quality).astype(np.float32),
            np.where(sure[:, None], self.first.cost, self.main.cost),
            np.where(sure, self.first.input_tokens, self.main.input_tokens),
            self.main.model_version,
        )

    def calibrate(self, profile: Profile) -> dict[str, Any]:
        """The parameters that meet the target on the scores as served, where which stage serves
        a prompt depends on those same parameters. A single floor (a share for the last tier
        only) and a budget's lambda are found by bisection on what the profile then does; the
        per-tier floors of a full share target by a damped fixed point (calibrate on the scores
        as served under the current floors, move halfway, repeat)."""
        params = calibrate(profile, self.main)
        names = profile.tier_names
        if profile.mode == "share" and profile.share_targets() is None:
            assert profile.shares is not None, "validated. This is a bug."
            top = profile.shares[names[-1]]

            def top_share(f: float) -> float:
                return self.outcome(profile, {"floors": [f] * (len(names) - 1) + [0.0]}).shares[-1]

            f = _bisect(top_share, 0.0, 1.0, top, increasing=True)
            return {"floors": [_round(f)] * (len(names) - 1) + [0.0]}
        if profile.mode == "budget":
            assert profile.budget_per_1k is not None, "validated. This is a bug."
            budget = profile.budget_per_1k

            def spend(lam: float) -> float:
                return self.outcome(profile, {"budget_lambda": lam}).cost_per_1k

            lam = _bisect(spend, 0.0, 4.0 * params["budget_lambda"] + 1.0, budget, increasing=False)
            return {"budget_lambda": _round(lam, up=True)}
        for _ in range(self.rounds):
            new = calibrate(profile, self.as_served(with_fields(profile, params)))
            mid = {k: _halfway(params[k], new[k]) for k in params}
            if mid == params:
                break
            params = mid
        return params

    def outcome(self, profile: Profile, params: dict[str, Any]) -> Outcome:
        p = with_fields(profile, params)
        return outcome(p, self.as_served(p), self.prompts)



def joined(a: Prompts, b: Prompts) -> Prompts:
    """Two sets of prompts as one, for deciding (their embeddings, of two encoders, are dropped)."""
    cat = (lambda x, y: None if x is None or y is None else np.concatenate([x, y]))  # noqa: E731
    return Prompts(a.texts + b.texts, a.keep + b.keep, a.contexts + b.contexts, sorted(set(a.files + b.files)),
                   None, cat(a.chars, b.chars), cat(a.input_tokens, b.input_tokens))  # fmt: skip


def run(
    profile: Profile, prompts: Prompts, model: LoadedModel, out_dir: Path | None, cache_dir: Path | None = CACHE_DIR,
    check: bool = False, first_logged: Prompts | None = None,
) -> tuple[Profile, dict[str, Any]]:
    """Score, calibrate (unless `check`: the profile as it is), report. Returns the calibrated
    profile and the record of what it does. `first_logged`: logged decisions a cascade's first
    stage made (read_log); each logged decision is then scored by the stage that made it, as
    logged, since the log holds only that stage's embedding."""
    if not len(prompts) + len(first_logged or ()):
        raise S.UnreachableTarget("no prompts to calibrate on")
    engine = RoutingEngine(model)
    cascade: Cascaded | None = None
    cascade_record: dict[str, Any] = {}
    if first_logged is not None and engine.first is not None:
        parts = [(p, score(engine, profile, p, cache_dir, stage))
                 for p, stage in ((prompts, None), (first_logged, engine.first)) if len(p)]  # fmt: skip
        scored = Scored(np.vstack([s.quality for _, s in parts]), np.vstack([s.cost for _, s in parts]),
                        np.concatenate([s.input_tokens for _, s in parts]), engine.version)  # fmt: skip
        main_share = len(prompts) / (len(prompts) + len(first_logged))
        prompts = joined(prompts, first_logged) if len(prompts) else first_logged
        cascade_record = {"cascade": {"margin": profile.cascade_margin, "main_share": main_share, "as_logged": True}}
    else:
        scored = score(engine, profile, prompts, cache_dir)
        if profile.cascade_margin is not None and engine.first is not None:
            if prompts.embedding is not None:  # logged by the main encoder alone: nothing for the first stage
                log.warning("profile %s has a cascade, but the log holds no decision of its first stage: "
                            "calibrating on the main encoder's decisions alone", profile.name)
            else:
                cascade = Cascaded(scored, score(engine, profile, prompts, cache_dir, engine.first), prompts)
    if check:
        params: dict[str, Any] = {}
    elif cascade is None:
        params = calibrate(profile, scored)
    else:
        params = cascade.calibrate(profile)
    calibrated = with_fields(profile, params)
    if cascade is not None:
        sure = cascade.settled(calibrated)
        scored = cascade.as_served(calibrated, sure)
        cascade_record = {"cascade": {"margin": calibrated.cascade_margin, "main_share": float(1.0 - sure.mean())}}
    got = outcome(calibrated, scored, prompts)
    result: dict[str, Any] = {
        "profile": profile.name,
        "mode": profile.mode,
        "target": target_text(profile),
        "parameters": params,
        "prompts": ", ".join(prompts.files),
        "n": len(prompts),
        "model_version": scored.model_version,
        "date": dt.date.today().isoformat(),
        "result": {"shares": got.shares, "quality": got.quality, "cost_per_1k": got.cost_per_1k},
        **cascade_record,
        "always": {
            t.name: dict(zip(("quality", "cost_per_1k"), always(scored, k), strict=True))
            for k, t in enumerate(profile.tiers)
        },
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        curves = sweep(scored)
        plot(calibrated, curves, result, out_dir / "tradeoff.png")
        (out_dir / "calibration.json").write_text(
            json.dumps(result | {"curves": curves, "plot": "tradeoff.png"}, indent=2) + "\n", "utf-8"
        )
    return calibrated, result


def record(result: dict[str, Any]) -> dict[str, Any]:
    """The `calibrated` table written into the profile."""
    r = result["result"]
    return {
        "prompts": result["prompts"],
        "n": result["n"],
        "date": result["date"],
        "model_version": result["model_version"],
        "shares": [round(s, 4) for s in r["shares"]],
        "quality": round(r["quality"], 4),
        "cost_per_1k": round(r["cost_per_1k"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training calibrate",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Exit status 2: an unreachable target, or a profile or prompts file that cannot be used.",
    )
    p.add_argument("--profile", required=True, help="profile name in the profiles file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, action="append",
                        help="JSONL (.gz allowed) of the deployment's prompts; repeat to combine files")
    source.add_argument("--from-log", metavar="URL",
                        help="the server's decision log (e.g. sqlite:///var/decisions.db): its logged traffic")
    p.add_argument("--log-profile", default=None,
                   help="with --from-log: only decisions logged under this profile (default: all)")
    p.add_argument("--log-days", type=float, default=None, help="with --from-log: only the last N days")
    p.add_argument("--profiles", type=Path, default=PROFILES, help="profiles file (default: config/profiles.toml)")
    p.add_argument("--model-dir", type=Path, default=MODELS, help="a model version, or models/ (its DEFAULT)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--share", action="append", metavar="TIER=FRAC",
                        help="target share (mode share): every tier, or the last tier only; repeatable")
    target.add_argument("--budget", type=float, metavar="USD_PER_1K", help="target cost (mode budget)")
    target.add_argument("--floor", type=float, metavar="F", help="quality floor (mode floor)")
    target.add_argument("--rework-cost", type=float, metavar="USD", help="cost of a failed answer (mode rework)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--exclude-fold", type=int, default=None,
                       help="leave out this fold of --k-folds by prompt hash (e.g. 0: the model's held-out fold)")
    folds.add_argument("--fold", type=int, default=None, help="keep only this fold of --k-folds (e.g. with --check)")
    p.add_argument("--k-folds", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="first N prompts only")
    p.add_argument("--write", action="store_true", help="write the parameters into the profiles file")
    p.add_argument("--check", action="store_true",
                   help="no calibration: report what the profile as written does on these prompts")
    p.add_argument("--out", type=Path, default=None, help="report folder (default build/calibrate/<profile>/)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="embed every prompt through the engine; skip the embedding cache in .cache/embeddings")
    args = p.parse_args(argv)

    targets = (args.share, args.budget, args.floor, args.rework_cost)
    if args.check and (args.write or any(t is not None for t in targets)):
        p.error("--check reports the profile as written: no targets, no --write")
    try:
        overrides = overrides_from(args)
        profile = load_target(args.profiles, args.profile, overrides, placeholders=not args.check)
        first_logged = None
        if args.from_log:
            model = load_model(args.model_dir, device="cpu")
            first = model.first_stage.encoder_spec.name if model.first_stage is not None else None
            prompts, first_logged = read_log(args.from_log, args.log_profile, args.log_days, args.limit,
                                             model.manifest.encoder.name, first)  # fmt: skip
        else:
            prompts = read_prompts(args.prompts, args.exclude_fold, args.k_folds, args.limit, args.fold)
            model = load_model(args.model_dir, device="cpu")
        calibrated, result = run(
            profile, prompts, model, args.out or OUT / args.profile, CACHE_DIR if args.cache else None, args.check,
            first_logged,
        )
    except S.UnreachableTarget as e:
        print(f"error: unreachable target for profile {args.profile!r}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ProfileError, ArtifactError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(table(calibrated, result))
    print("\nwritten:", (args.out or OUT / args.profile) / "calibration.json", "and tradeoff.png")
    for name, share in (calibrated.shares or {}).items():
        got = result["result"]["shares"][calibrated.tier_index(name)]
        if calibrated.mode == "share" and abs(got - share) > 0.01:
            print(f"note: {name} gets {got:.1%} against a target of {share:.0%}: rules or ties move it")
    if args.write:
        fields = {k: v for k, v in overrides.items()} | result["parameters"] | {"calibrated": record(result)}
        try:
            warning = write_profile(args.profiles, args.profile, fields)
        except ProfileError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.profiles}: profiles.{args.profile} updated: " + ", ".join(sorted(fields)))
    return 0



# -- `python -m training cost-table`: targets on the shared data's held-out fold, with real labels ------


DEFAULT_TARGETS = (
    "floor=0.3", "floor=0.5", "floor=0.7",
    "share=last:0.1", "share=last:0.2", "share=last:0.4", "share=0.5,0.3,0.2",
    "budget=1", "budget=2", "budget=3", "budget=5",
    "rework=0.01", "rework=0.02", "rework=0.05", "rework=0.1",
)
DEFAULT_PAIRS = ("default:alpaca_eval_binary", "routellm-pair:mmlu")


def parse_target(spec: str, profile: Profile) -> dict[str, Any]:
    """`floor=F`, `share=last:S` (the last tier only), `share=S0,S1,...` (every tier), `budget=USD`,
    `rework=USD` -> profile fields. A share spec that does not fit the profile's tiers gives {}."""
    mode, _, value = spec.partition("=")
    if mode == "floor":
        return {"mode": "floor", "floor": float(value)}
    if mode == "budget":
        return {"mode": "budget", "budget_per_1k": float(value), "budget_lambda": 0.0}
    if mode == "rework":
        return {"mode": "rework", "rework_cost": float(value)}
    if mode == "share":
        names = profile.tier_names
        if value.startswith("last:"):
            shares = {names[-1]: float(value[5:])}
        else:
            values = [float(v) for v in value.split(",")]
            if len(values) != len(names):
                return {}
            shares = dict(zip(names, values, strict=True))
        return {"mode": "share", "shares": shares, "floors": [0.0] * len(names)}
    raise ValueError(f"target {spec!r}: expected floor=, share=, budget= or rework=")


def labels_for(data: D.RoutingData, dataset: str, profile: Profile) -> npt.NDArray[np.float64]:
    """(N, T) real outcome of each tier's model on each prompt of `dataset`; the reference model of a
    `reference` data set scores 0.5 (it ties with itself, as training.crossval counts it)."""
    rows, models, mat = data.outcome_matrix(dataset)
    assert (rows == np.arange(data.n_rows)).all(), "one data set loaded: its rows are all rows. This is a bug."
    cols = []
    for t in profile.tiers:
        if t.model in models:
            cols.append(mat[:, models.index(t.model)].astype(np.float64))
        elif t.model == D.REFERENCE_MODEL and D.FILES[dataset]["compare"] == "reference":
            cols.append(np.full(len(rows), 0.5))
        else:
            raise ValueError(f"{dataset} has no label for {t.model!r} (tier {t.name} of {profile.name}); "
                             f"it labels {models}")
    return np.stack(cols, axis=1)


def cost_table(
    profile: Profile, dataset: str, model: LoadedModel, targets: Sequence[str] = DEFAULT_TARGETS,
    holdout_fold: int = 0, k_folds: int = 10, data_dir: Path = D.DATA_DIR, cache_dir: Path | None = CACHE_DIR,
) -> dict[str, Any]:
    """Each target calibrated on the data set's other folds, then served on its held-out fold:
    tier shares, expected cost per 1,000 requests, predicted and real quality of the chosen tier."""
    data = D.load([dataset], data_dir)
    labels = labels_for(data, dataset, profile)
    prompts = Prompts(data.prompts, ["head"] * data.n_rows, [RequestContext()] * data.n_rows, [dataset])
    scored = score(RoutingEngine(model), profile, prompts, cache_dir)
    test = D.folds(data.prompts, k_folds) == holdout_fold
    cal_scored, test_scored, test_prompts = scored.subset(~test), scored.subset(test), prompts.subset(test)
    y = labels[test]
    rows: list[dict[str, Any]] = []
    for spec in targets:
        fields = parse_target(spec, profile)
        if not fields:
            continue
        p = with_fields(profile, fields)
        row: dict[str, Any] = {"target": target_text(p), "spec": spec}
        try:
            params = calibrate(p, cal_scored)
        except S.UnreachableTarget as e:
            rows.append(row | {"unreachable": str(e)})
            continue
        got = outcome(with_fields(p, params), test_scored, test_prompts)
        real = y[np.arange(len(y)), got.tier_index]
        rows.append(row | {
            "parameters": params, "shares": got.shares, "cost_per_1k": got.cost_per_1k,
            "predicted_quality": got.quality, "real_quality": float(real.mean()),
            "real_quality_se": float(real.std(ddof=1) / np.sqrt(len(real))),
        })
    for k, t in enumerate(profile.tiers):
        q, c = always(test_scored, k)
        rows.append({"target": f"always {t.name}", "spec": f"always={t.name}",
                     "shares": [float(j == k) for j in range(len(profile.tiers))], "cost_per_1k": c,
                     "predicted_quality": q, "real_quality": float(y[:, k].mean()),
                     "real_quality_se": float(y[:, k].std(ddof=1) / np.sqrt(len(y)))})
    return {
        "profile": profile.name, "tiers": {t.name: t.model for t in profile.tiers}, "dataset": dataset,
        "label": D.FILES[dataset]["compare"], "model_version": model.version,
        "calibrated_on": int((~test).sum()), "held_out": int(test.sum()),
        "split": f"calibrated on folds != {holdout_fold}, served on fold {holdout_fold} of {k_folds} by prompt hash",
        "expected_output_tokens": profile.expected_output_tokens, "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    names = list(result["tiers"])
    head = ("| target | parameters | " + " | ".join(f"{n} %" for n in names)
            + " | USD / 1k requests | predicted quality | real quality (± s.e.) |")
    lines = [head, "|" + "---|" * 2 + "---:|" * (len(names) + 3)]
    for r in result["rows"]:
        if "unreachable" in r:
            lines.append(f"| {r['target']} | unreachable: {r['unreachable']} |" + " |" * (len(names) + 3))
            continue
        params = ", ".join(
            f"{k} = [{', '.join(f'{x:.4g}' for x in v)}]" if isinstance(v, list) else f"{k} = {v:.4g}"
            for k, v in r.get("parameters", {}).items()
        )
        lines.append(
            f"| {r['target']} | {params} | " + " | ".join(f"{s * 100:.1f}" for s in r["shares"])
            + f" | {r['cost_per_1k']:.2f} | {r['predicted_quality']:.3f}"
            + f" | {r['real_quality']:.3f} ± {r['real_quality_se']:.3f} |"
        )
    return "\n".join(lines)


def cost_table_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training cost-table",
        description="Cost per 1,000 requests and real quality of a profile at several targets, calibrated on "
        "the shared data's training folds and served on its held-out fold (docs/evaluation.md).",
    )
    p.add_argument("--pair", action="append", metavar="PROFILE:DATASET",
                   help=f"profile and labeled data set; repeatable (default: {' '.join(DEFAULT_PAIRS)})")
    p.add_argument("--target", action="append", help="floor=F | share=last:S | share=S0,S1,.. | budget=USD | "
                   "rework=USD; repeatable (default: floors 0.3/0.5/0.7, last-tier shares 10/20/40 %%, ...)")
    p.add_argument("--profiles", type=Path, default=PROFILES)
    p.add_argument("--model-dir", type=Path, default=MODELS)
    p.add_argument("--data-dir", type=Path, default=D.DATA_DIR)
    p.add_argument("--holdout-fold", type=int, default=0, help="the model's held-out fold (training fit's default)")
    p.add_argument("--k-folds", type=int, default=10)
    p.add_argument("--out", type=Path, default=OUT, help="writes cost-table-<profile>-<dataset>.json here")
    args = p.parse_args(argv)
    model = load_model(args.model_dir, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    for pair in args.pair or DEFAULT_PAIRS:
        name, _, dataset = pair.partition(":")
        try:
            profile = load_target(args.profiles, name, {})
            result = cost_table(profile, dataset, model, args.target or DEFAULT_TARGETS, args.holdout_fold,
                                args.k_folds, args.data_dir)
        except (ProfileError, ArtifactError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        path = args.out / f"cost-table-{name}-{dataset}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
        print(f"\n{name} ({', '.join(f'{k} {v}' for k, v in result['tiers'].items())}) on {dataset}: "
              f"{result['split']} ({result['calibrated_on']} / {result['held_out']} prompts), "
              f"model {result['model_version']}\n")
        print(markdown(result))
        print(f"\nwritten: {path}")
    return 0
