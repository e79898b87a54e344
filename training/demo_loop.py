"""`python -m training demo-loop`: the whole loop on real data, through the real server.

1. A work directory: a models root holding a copy of the shipped default version, the profiles
   (config/profiles.toml and its price catalog, plus a `demo` profile: RouteLLM's pair at a quality
   floor, exploring), a decision log and an MLflow store.
2. `python -m router serve` on it, polling the root's DEFAULT for a promoted version.
3. Phase 1: MMLU prompts of the shipped model's held-out fold (training.data.prompt_fold), routed
   with profile `demo`, and each decision's outcome reported: the data's label of the model chosen.
4. `python -m training retrain --from-log` into the work directory's models root; its comparison
   and promotion gate are printed.
5. If promoted, wait until the server has swapped the new version in (no restart), then phase 2:
   other held-out prompts, routed and reported the same way. The old version's choices on the
   phase-2 prompts come from the server's own engine (router.engine) run in-process on it.
6. Figures per phase beside always-weak, always-strong and the oracle; result.json.

The figures: "served" is what the server answered, exploration included; "policy" is the tier the
profile's rule picks from the same answer's per-tier quality without exploration (the cheapest tier
clearing the floor). Success is the data's label of the model chosen, cost the answer's expected cost
(the profile's prices, its expected output tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router.artifacts import DEFAULT_POINTER, MANIFEST, load_model, resolve_model_dir
from router.decisionlog import DecisionLog, decisions
from router.engine import RouteQuery, RoutingEngine
from router.profiles import load_profiles
from router.scoring import choose_floor
from training import data as D

REPO = Path(__file__).resolve().parents[1]
PROFILE = "demo"
WEAK, STRONG = "mixtral-8x7b-instruct-v0.1", D.REFERENCE_MODEL  # the two models MMLU labels
RESULT = REPO / "build" / "demo-loop" / "result.json"


@dataclass
class DemoConfig:
    n: int = 700  # prompts per phase; the shipped model's held-out fold has 1,414 MMLU prompts
    exploration: float = 0.1  # the demo profile's exploration_rate
    floor: float = 0.6  # the demo profile's quality floor
    cascade_margin: float | None = None  # the demo profile's cascade_margin (None: the main encoder on every call)
    keep: str = ""  # work directory, kept ("": a temporary one; result.json then goes to build/demo-loop/)
    seed: int = 0  # which held-out prompts go to which phase
    concurrency: int = 8  # Route calls in flight
    threads: int = 1  # the server's ONNX Runtime threads
    models_dir: str = str(REPO / "models")  # the shipped models root (only read)
    data_dir: str = str(D.DATA_DIR)
    retrain_args: list[str] = field(default_factory=list)  # more flags for retrain (e.g. --limit 800 --steps 30)
    swap_timeout: float = 180.0  # seconds to wait for the server to serve a promoted version


# -- 1. the work directory ----------------------------------------------------------------


def demo_profile(floor: float, exploration: float, cascade_margin: float | None = None) -> str:
    cascade = f"cascade_margin = {cascade_margin}\n" if cascade_margin is not None else ""
    return f"""

[profiles.{PROFILE}]
description = "training/demo_loop.py: RouteLLM's pair at a quality floor, exploring"
mode = "floor"
floor = {floor}
exploration_rate = {exploration}
{cascade}tiers = [
  {{ name = "weak", model = "{WEAK}" }},
  {{ name = "strong", model = "{STRONG}" }},
]
"""


def set_up(cfg: DemoConfig, work: Path) -> tuple[Path, Path, str]:
    """(models root, profiles file, live version) inside `work`: copies, never links, so nothing
    the demo does reaches the repo's models/ or config/."""
    source = resolve_model_dir(Path(cfg.models_dir))
    root = work / "models"
    shutil.copytree(source, root / source.name)
    (root / DEFAULT_POINTER).write_text(source.name + "\n", "utf-8")
    config = work / "config"
    config.mkdir()
    shutil.copy2(REPO / "config" / "prices.toml", config / "prices.toml")
    profiles = config / "profiles.toml"
    profiles.write_text((REPO / "config" / "profiles.toml").read_text("utf-8") + demo_profile(cfg.floor,
                        cfg.exploration, cfg.cascade_margin), "utf-8")  # fmt: skip
    load_profiles(profiles)  # refuse a bad flag here, not in the server's log
    return root, profiles, source.name


# -- the prompts: the held-out fold's MMLU rows, two disjoint slices ---------------------------------


@dataclass
class Prompts:
    ids: list[str]
    texts: list[str]
    labels: npt.NDArray[np.float32]  # (n, 2) the data's outcome of the weak and the strong model


def held_out_prompts(cfg: DemoConfig, model_dir: Path) -> tuple[Prompts, Prompts, dict[str, Any]]:
    """Two disjoint random slices of the MMLU prompts in the live model's held-out fold (its manifest
    says which fold of how many; training.data.prompt_fold computes a prompt's fold)."""
    config = json.loads((model_dir / MANIFEST).read_text("utf-8"))["training"]["config"]
    k, fold = int(config["k_folds"]), int(config["holdout_fold"])
    rows, seen = [], set()
    for rec in D.read_jsonl(Path(cfg.data_dir) / D.FILES["mmlu"]["file"]):
        text = str(rec["prompt"])
        norm = " ".join(text.lower().split())
        if D.prompt_fold(text, k) == fold and norm not in seen:  # copies of a question: the first only
            seen.add(norm)
            rows.append(rec)
    if 2 * cfg.n > len(rows):
        raise SystemExit(f"--n {cfg.n}: fold {fold} of {k} holds {len(rows)} distinct MMLU prompts, "
                         f"at most {len(rows) // 2} per phase")  # fmt: skip
    order = np.random.default_rng(cfg.seed).permutation(len(rows))

    def take(idx: npt.NDArray[np.int64]) -> Prompts:
        recs = [rows[i] for i in idx]
        labels = [[float(r["outcomes"][WEAK]), float(r["outcomes"][STRONG])] for r in recs]  # type: ignore[index]
        return Prompts([str(r["id"]) for r in recs], [str(r["prompt"]) for r in recs], np.array(labels, np.float32))

    source = {"data": "mmlu", "fold": fold, "k_folds": k, "fold_prompts": len(rows), "per_phase": cfg.n}
    return take(order[: cfg.n]), take(order[cfg.n : 2 * cfg.n]), source


# -- 3. replay through the server -------------------------------------------------------------


@dataclass
class Replay:
    """What the server answered, per prompt."""

    quality: npt.NDArray[np.float32]  # (n, T)
    costs: npt.NDArray[np.float64]  # (n, T) expected USD per tier
    chosen: npt.NDArray[np.int64]  # (n,)
    decision_ids: list[str]
    reasons: list[str]
    versions: list[str]
    acknowledged: int  # outcomes the server stored (created=True)


async def _replay(target: str, prompts: Prompts, concurrency: int) -> Replay:
    import grpc

    from router.v1 import router_pb2, router_pb2_grpc

    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(i: int) -> tuple[Any, bool]:
            async with gate:
                resp = await stub.Route(router_pb2.RouteRequest(
                    prompt=prompts.texts[i], profile=PROFILE, request_id=prompts.ids[i]))  # fmt: skip
                tier = [s.model for s in resp.scores].index(resp.model)
                ack = await stub.ReportOutcome(router_pb2.OutcomeRequest(
                    decision_id=resp.decision_id, success=bool(prompts.labels[i, tier] >= 0.5),
                    cost_usd=resp.expected_cost, label="demo-loop:mmlu"))  # fmt: skip
                return resp, ack.created

        answers = await asyncio.gather(*(one(i) for i in range(len(prompts.ids))))
    resps = [r for r, _ in answers]
    return Replay(
        quality=np.array([[s.quality for s in r.scores] for r in resps], np.float32),
        costs=np.array([[s.expected_cost for s in r.scores] for r in resps], np.float64),
        chosen=np.array([[s.model for s in r.scores].index(r.model) for r in resps], np.int64),
        decision_ids=[r.decision_id for r in resps],
        reasons=[r.reason for r in resps],
        versions=[r.model_version for r in resps],
        acknowledged=sum(created for _, created in answers),
    )


def replay(target: str, prompts: Prompts, concurrency: int) -> Replay:
    return asyncio.run(_replay(target, prompts, concurrency))


def offline(model_dir: Path, profiles: Path, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    """(quality, costs) per tier from `model_dir` through the server's engine, in-process."""
    engine = RoutingEngine(load_model(model_dir, device="cpu", intra_op_threads=1))
    profile = load_profiles(profiles)[PROFILE]
    results = []
    for start in range(0, len(prompts.texts), 32):
        results += engine.route_batch([RouteQuery(t, profile) for t in prompts.texts[start : start + 32]])
    return np.array([r.quality for r in results], np.float32), np.array([r.costs for r in results], np.float64)


# -- figures ------------------------------------------------------------------------------------


def outcome_figures(chosen: np.ndarray, labels: np.ndarray, costs: np.ndarray) -> dict[str, float]:
    """Success (mean label of the model chosen), share of the most capable tier, USD per 1,000."""
    rows = np.arange(len(chosen))
    return {
        "success": float(labels[rows, chosen].mean()),
        "strong_share": float((chosen == labels.shape[1] - 1).mean()),
        "usd_per_1k": float(costs[rows, chosen].mean() * 1000),
    }


def phase_figures(quality: np.ndarray, costs: np.ndarray, labels: np.ndarray, floor: float,
                  served: np.ndarray | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """The policy's figures (the cheapest tier clearing the floor, no exploration), the served ones
    when given, and the baselines: always the cheapest tier, always the most capable, the oracle
    (the cheapest tier whose answer was right, else the cheapest)."""
    n, t = labels.shape
    policy, _ = choose_floor(quality, floor, np.ones((n, t), bool))
    right = labels >= 0.5
    oracle = np.where(right.any(axis=1), right.argmax(axis=1), 0)
    out = {} if served is None else {"served": outcome_figures(served, labels, costs)}
    return out | {
        "policy": outcome_figures(policy, labels, costs),
        "always_weak": outcome_figures(np.zeros(n, np.int64), labels, costs),
        "always_strong": outcome_figures(np.full(n, t - 1, np.int64), labels, costs),
        "oracle": outcome_figures(oracle, labels, costs),
    }


def logged_propensity(url: str, ids: Sequence[str]) -> npt.NDArray[np.float64]:
    """The propensity the decision log holds for each decision (nan where it holds none)."""
    import sqlalchemy as sa

    found: dict[str, float] = {}
    with DecisionLog(url) as decision_log, decision_log.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            query = sa.select(decisions.c.decision_id, decisions.c.propensity).where(
                decisions.c.decision_id.in_(list(ids[start : start + 500])))  # fmt: skip
            found |= {d: float(p) for d, p in conn.execute(query)}
    return np.array([found.get(d, np.nan) for d in ids], np.float64)


def exploration_figures(r: Replay, url: str) -> dict[str, Any]:
    """How the phase explored, as the decision log recorded it (its propensities feed retrain)."""
    propensity = logged_propensity(url, r.decision_ids)
    return {
        "explored": sum(reason == "exploration" for reason in r.reasons),
        "logged": int(np.isfinite(propensity).sum()),
        "propensity_min": float(np.nanmin(propensity)),
        "propensity_below_1": int((propensity < 1).sum()),
        "versions": sorted(set(r.versions)),
        "acknowledged": r.acknowledged,
    }


# -- 4. retrain ---------------------------------------------------------------------------------


def run_retrain(cfg: DemoConfig, work: Path, url: str, models: Path, profiles: Path) -> dict[str, Any]:
    """`python -m training retrain` as a child process, in `work` (MLflow's store and artifacts
    there too); its report is printed as it comes, its log kept in work/retrain.log."""
    cmd = [
        sys.executable, "-m", "training", "retrain", "--from-log", url, "--models-dir", str(models),
        "--profiles-path", str(profiles), "--min-outcomes", str(min(200, cfg.n // 2)), *cfg.retrain_args,
    ]  # fmt: skip
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }  # fmt: skip
    print("$ python -m training retrain " + shlex.join(cmd[4:]), flush=True)
    t0 = time.perf_counter()
    lines = []
    with open(work / "retrain.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None, "Popen was given stdout=PIPE. This is a bug."
        for line in proc.stdout:
            print("  " + line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    if rc != 0:
        tail = (work / "retrain.log").read_text().splitlines()[-30:]
        raise RuntimeError(f"retrain exited {rc}:\n" + "\n".join(tail))
    summary = json.loads(lines[-1])
    return {
        "command": cmd[1:],
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "gate": [line.strip() for line in lines if re.match(r"\s*\[(pass|FAIL|skip)\]", line)],
        "report": lines[:-1],
    }


def wait_for_swap(server: Any, old: str, new: str, timeout: float) -> float:
    """Seconds until the server logs that it serves `new`; raises if it refuses it or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = "".join(server.log)
        if f"model swapped: {old} -> {new}" in text:
            return time.monotonic() - t0
        if f"model {new} refused" in text:
            raise RuntimeError(f"the server refused {new}:\n{text[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"the server did not swap in {new} within {timeout:.0f}s")


# -- the demo -----------------------------------------------------------------------------------


def demo(cfg: DemoConfig, work: Path) -> dict[str, Any]:
    from bench.serverproc import ServerProcess

    t_start = time.perf_counter()
    shipped_default = (Path(cfg.models_dir) / DEFAULT_POINTER).read_text().strip()
    models, profiles, old = set_up(cfg, work)
    phase1, phase2, source = held_out_prompts(cfg, models / old)
    url = f"sqlite:///{work / 'decisions.db'}"
    result: dict[str, Any] = {"config": asdict(cfg), "work_dir": str(work), "prompts": source, "live_version": old}
    print(f"work directory {work}; serving {old} (a copy) with profile {PROFILE!r}: weak {WEAK}, strong {STRONG}, "
          f"floor {cfg.floor}, exploration {cfg.exploration}"
          + (f", cascade margin {cfg.cascade_margin}" if cfg.cascade_margin is not None else ""))  # fmt: skip
    print(f"prompts: {cfg.n} + {cfg.n} of the {source['fold_prompts']} distinct MMLU prompts in fold "
          f"{source['fold']} of {source['k_folds']} (never trained on by {old})", flush=True)  # fmt: skip

    # 2. the server, on the work directory's models root, profiles and log
    server = ServerProcess(
        models, threads=cfg.threads, decision_log=url,
        args=["--profiles-path", str(profiles), "--default-profile", PROFILE, "--model-reload-seconds", "0.5"],
        env={"ROUTER_DECISION_LOG_SALT": "demo-loop"},
    )  # fmt: skip
    try:
        def run_phase(n: int, prompts: Prompts, served_by: str) -> None:
            """Route the phase's prompts, report the label of the model chosen, record the figures."""
            t0 = time.perf_counter()
            replayed = replay(server.target, prompts, cfg.concurrency)
            print(f"phase {n}: {cfg.n} routed and reported in {time.perf_counter() - t0:.1f}s", flush=True)
            result[f"phase{n}"] = {
                "served_by": served_by,
                "figures": phase_figures(replayed.quality, replayed.costs, prompts.labels, cfg.floor,
                                         replayed.chosen),
                **exploration_figures(replayed, url),
            }

        # 3. phase 1: route, report the label of the model chosen
        run_phase(1, phase1, old)
        # 4. retrain from the log into the work directory's models root
        retrain = run_retrain(cfg, work, url, models, profiles)
        result["retrain"] = retrain
        summary = retrain["summary"]
        promoted = bool(summary.get("promoted"))
        new = summary.get("candidate_version", "") if promoted else old
        # 5. the server swaps the promoted version in; phase 2 on other prompts
        if promoted:
            result["swap_seconds"] = round(wait_for_swap(server, old, new, cfg.swap_timeout), 2)
            print(f"server swapped {old} -> {new} (seen {result['swap_seconds']}s after retrain exited; no restart)",
                  flush=True)
        run_phase(2, phase2, new)
        if promoted:  # the old version on the same prompts: the same engine, in-process
            quality, costs = offline(models / old, profiles, phase2)
            result["phase2"]["old_policy"] = phase_figures(quality, costs, phase2.labels, cfg.floor)["policy"]
    finally:
        result["server_exit_code"] = server.stop()
    with DecisionLog(url) as decision_log:
        result["log"] = {"decisions": decision_log.count(), "outcomes": decision_log.count(with_outcome=True)}
    result |= {
        "promoted": promoted,
        "served_version_after": new,
        "default_after": resolve_model_dir(models).name,
        "repo_default_unchanged": (Path(cfg.models_dir) / DEFAULT_POINTER).read_text().strip() == shipped_default,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return result


def table(result: dict[str, Any]) -> str:
    """The figures before and after, for people."""
    head = f"  {'':54}{'success':>9}{'strong share':>14}{'USD / 1k req':>14}"

    def row(name: str, f: dict[str, float]) -> str:
        return f"  {name:54}{f['success']:>9.4f}{f['strong_share']:>14.3f}{f['usd_per_1k']:>14.3f}"

    p1, p2 = result["phase1"], result["phase2"]
    old, new = p1["served_by"], p2["served_by"]
    n = result["prompts"]["per_phase"]
    lines = [f"phase 1, before: {n} held-out prompts, served by {old}", head,
             row("served (exploration on)", p1["figures"]["served"]),
             row(f"policy of {old} (no exploration)", p1["figures"]["policy"])]  # fmt: skip
    lines += [row(k.replace("_", " "), p1["figures"][k]) for k in ("always_weak", "always_strong", "oracle")]
    lines += [f"phase 2, after: {n} other held-out prompts, served by {new}"
              + ("" if result["promoted"] else " (not promoted: unchanged)"), head,
              row("served (exploration on)", p2["figures"]["served"]),
              row(f"policy of {new} (no exploration)", p2["figures"]["policy"])]  # fmt: skip
    if "old_policy" in p2:
        lines.append(row(f"policy of {old} (same prompts, in-process)", p2["old_policy"]))
    lines += [row(k.replace("_", " "), p2["figures"][k]) for k in ("always_weak", "always_strong", "oracle")]
    s = result["retrain"]["summary"]
    lines.append(
        f"promotion: {'PROMOTED ' + s['candidate_version'] if result['promoted'] else 'not promoted'}"
        + (f" ({s.get('reason')})" if not result["promoted"] and s.get("reason") else "")
        + f"; gate: {'; '.join(' '.join(g.split()) for g in result['retrain']['gate']) or 'not reached'}"
    )
    lines.append(
        f"log: {result['log']['decisions']} decisions, {result['log']['outcomes']} outcomes; explored "
        f"{p1['explored']} + {p2['explored']}, logged propensity < 1 for {p1['propensity_below_1']} + "
        f"{p2['propensity_below_1']} (min {min(p1['propensity_min'], p2['propensity_min']):.3f})"
        f"; phase 2 answered by {', '.join(p2['versions'])}; {result['seconds']}s in all"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m training demo-loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--n", type=int, default=defaults.n, help="prompts per phase (default %(default)s)")
    p.add_argument("--exploration", type=float, default=defaults.exploration, help="the demo profile's rate")
    p.add_argument("--floor", type=float, default=defaults.floor, help="the demo profile's quality floor")
    p.add_argument("--cascade-margin", type=float, default=None,
                   help="the demo profile's cascade_margin: the version's first stage decides what it is sure of, "
                   "and a retrain refits each stage on its own decisions (default: none, the main encoder only)")
    p.add_argument("--keep", default="", help="work directory to keep (empty or new); result.json goes there")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--concurrency", type=int, default=defaults.concurrency)
    p.add_argument("--threads", type=int, default=defaults.threads, help="the server's ONNX Runtime threads")
    p.add_argument("--models-dir", default=defaults.models_dir, help="the shipped models root (only read)")
    p.add_argument("--data-dir", default=defaults.data_dir)
    p.add_argument("--retrain-args", default="", help='more retrain flags, e.g. "--steps 30 --no-track"')
    p.add_argument("--swap-timeout", type=float, default=defaults.swap_timeout)
    args = vars(p.parse_args(argv))
    args["retrain_args"] = shlex.split(args["retrain_args"])
    cfg = DemoConfig(**args)
    if cfg.keep:
        work = Path(cfg.keep).resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--keep {work}: not empty; give a new or empty directory")
        work.mkdir(parents=True, exist_ok=True)
        result = demo(cfg, work)
        out = work / "result.json"
    else:
        with tempfile.TemporaryDirectory(prefix="demo-loop-") as tmp:
            result = demo(cfg, Path(tmp))
        result["work_dir"] += " (removed; --keep DIR keeps it)"
        out = RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(table(result))
    print(f"result: {out}")
    return 0
