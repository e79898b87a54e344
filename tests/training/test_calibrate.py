"""`python -m training calibrate`: targets met on held-out prompts, --write round trip, unreachable targets."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from router.artifacts import load_model
from router.engine import RoutingEngine
from router.profiles import ProfileError, load_profiles
from tests.conftest import MODELS, PROFILES, require_data
from training import calibrate as C
from training import data as D


def _prompts_file(path: Path, n: int = 40) -> Path:
    """n MMLU prompts plus two chat transcripts, as a deployment's JSONL."""
    rows = D.read_jsonl(require_data() / "mmlu.jsonl.gz")[:n]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
        for text in ("Summarize the attached contract.", "Write a haiku about routers."):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": text}]}) + "\n")
    return path


def _profiles_copy(tmp_path: Path) -> Path:
    shutil.copy(PROFILES.parent / "prices.toml", tmp_path / "prices.toml")
    return Path(shutil.copy(PROFILES, tmp_path / "profiles.toml"))


@pytest.mark.slow
def test_calibrated_shares_hold_on_held_out_prompts() -> None:
    """Two disjoint sets of ~2,200 shared-data prompts (MMLU + AlpacaEval, folds 1-3 and 4-6 of 20
    by prompt hash; both inside the shipped model's training folds, so they are alike to it).
    Floors calibrated on one set are served on the other, both ways.

    A share measured on n prompts carries sampling noise of sqrt(p(1-p)/n) from each set: about
    1.2 points at p = 0.2 and 1.5 at p = 0.5 for one direction here, so one direction is checked
    against 3 of those standard deviations. Pooling the two directions, every prompt is still
    served by floors fitted without it, and the noise of the two cancels to first order while a
    bias of the calibration would not: that is where the target must hold within 1 point."""
    data_dir = require_data()
    prompts = C.read_prompts([data_dir / "mmlu.jsonl.gz", data_dir / "alpaca_eval.jsonl.gz"])
    fold20 = np.array([D.prompt_fold(t, 20) for t in prompts.texts])
    prompts = prompts.subset(np.isin(fold20, [1, 2, 3, 4, 5, 6]))
    in_a = np.isin(np.array([D.prompt_fold(t, 20) for t in prompts.texts]), [1, 2, 3])
    profile = C.load_target(PROFILES, "default", {})
    model = load_model(MODELS, device="cpu", intra_op_threads=0)
    scored = C.score(RoutingEngine(model), profile, prompts)  # one pass through the serving encoder

    for shares in ({"frontier": 0.2}, {"budget": 0.5, "mid": 0.3, "frontier": 0.2}):
        p = C.with_fields(profile, {"mode": "share", "shares": shares, "floors": [0.0] * 3})
        target = np.array([shares.get(n, np.nan) for n in p.tier_names])
        served = np.empty(len(prompts), np.int64)
        for cal in (in_a, ~in_a):
            params = C.calibrate(p, scored.subset(cal))
            fitted = C.with_fields(p, params)
            own = C.outcome(fitted, scored.subset(cal), prompts.subset(cal))
            held = C.outcome(fitted, scored.subset(~cal), prompts.subset(~cal))
            served[~cal] = held.tier_index
            n_cal, n_held = int(cal.sum()), int((~cal).sum())
            noise = np.sqrt(target * (1 - target) * (1 / n_cal + 1 / n_held))
            dev = np.array(held.shares) - target
            print(f"{shares}: calibrated on {n_cal}, served {n_held}: held-out shares {np.round(held.shares, 4)}, "
                  f"deviation {np.round(dev * 100, 2)} points, noise s.d. {np.round(noise * 100, 2)}")
            mask = ~np.isnan(target)
            assert np.all(np.abs(np.array(own.shares) - target)[mask] <= 2 / n_cal)  # in sample: exact but ties
            assert np.all(np.abs(dev[mask]) <= 3 * noise[mask]), (dev, noise)
        pooled = np.array([np.mean(served == k) for k in range(3)]) - target
        print(f"{shares}: pooled held-out deviation {np.round(pooled * 100, 2)} points on {len(prompts)} prompts")
        assert np.all(np.abs(pooled[~np.isnan(target)]) < 0.01), pooled


def test_write_round_trip_keeps_comments(tmp_path: Path) -> None:
    path = _profiles_copy(tmp_path)
    before = path.read_text("utf-8")
    prompts = _prompts_file(tmp_path / "traffic.jsonl.gz")
    rc = C.main([
        "--profile", "default", "--profiles", str(path), "--prompts", str(prompts), "--no-cache",
        "--share", "budget=0.5", "--share", "mid=0.3", "--share", "frontier=0.2",
        "--write", "--out", str(tmp_path / "out"),
    ])
    assert rc == 0
    after = path.read_text("utf-8")
    # every comment survives, but the one on `mode`, which now says what mode share does
    comments = [line[line.index("#"):] for line in before.splitlines() if "#" in line and not line.startswith("mode")]
    assert comments and all(c in after for c in comments)
    assert C.MODE_COMMENTS["share"] in after
    profiles = load_profiles(path)
    default = profiles["default"]
    assert default.mode == "share" and default.floors is not None and len(default.floors) == len(default.tiers)
    assert default.calibrated is not None
    assert default.calibrated["n"] == 42 and default.calibrated["prompts"] == "traffic.jsonl.gz"
    assert len(default.calibrated["shares"]) == 3 and default.calibrated["cost_per_1k"] > 0
    assert abs(sum(default.calibrated["shares"]) - 1) < 1e-3
    old, new = tomllib.loads(before)["profiles"], tomllib.loads(after)["profiles"]
    assert {k: v for k, v in old.items() if k != "default"} == {k: v for k, v in new.items() if k != "default"}
    assert new["default"]["rules"] == old["default"]["rules"]
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert report["result"]["shares"] == pytest.approx(default.calibrated["shares"], abs=1e-4)
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 10_000
    assert not list(tmp_path.glob(".profiles.toml.*"))  # the temp file was renamed over, not left behind


def test_write_refuses_a_file_that_would_not_load(tmp_path: Path) -> None:
    path = _profiles_copy(tmp_path)
    before = path.read_text("utf-8")
    with pytest.raises(ProfileError, match="floors"):
        C.write_profile(path, "default", {"mode": "share", "shares": {"frontier": 0.2}, "floors": [0.5]})
    assert path.read_text("utf-8") == before


@pytest.mark.parametrize("budget", [0.05, 0.062])
def test_unreachable_budget_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: float) -> None:
    """0.05 is below the cheapest tier's output cost alone (0.06, the profile check); 0.062 is above that but
    below the cheapest tier's cost with these prompts' input tokens (the calibration)."""
    path = _profiles_copy(tmp_path)
    before = path.read_text("utf-8")
    rc = C.main([
        "--profile", "default", "--profiles", str(path), "--prompts", str(_prompts_file(tmp_path / "p.jsonl.gz")),
        "--budget", str(budget), "--write", "--no-cache", "--out", str(tmp_path / "out"),
    ])
    assert rc == 2
    err = capsys.readouterr().err
    assert "budget_per_1k" in err and "unreachable" in err
    assert path.read_text("utf-8") == before


def test_round_up_never_spends_more() -> None:
    for x in (0.013979853, 1.00000049e-3, 7.0):
        assert C._round(x, up=True) >= x and math.isclose(C._round(x, up=True), x, rel_tol=1e-5)


def test_calibrate_from_the_decision_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The traffic a server logged (embeddings, lengths, token counts; no prompts) is enough. A
    cascade's logged decisions are each scored by the stage that made them (its embedding)."""
    import datetime as dt

    from router.decisionlog import DecisionLog, DecisionRecord, encode_embedding
    from router.engine import RouteQuery

    rows = D.read_jsonl(require_data() / "mmlu.jsonl.gz")[:260]
    model = load_model(MODELS, device="cpu", intra_op_threads=0)
    assert model.first_stage is not None, "the shipped default is a cascade"
    shipped = load_profiles(PROFILES)["default"]
    plain = shipped.model_copy(update={"cascade_margin": None})  # the main encoder on every call
    engine = RoutingEngine(model)
    results = engine.route_batch([RouteQuery(r["prompt"], plain) for r in rows[:200]])
    results += engine.route_batch([RouteQuery(r["prompt"], shipped) for r in rows[200:]])  # both stages
    first = sum(r.encoder == model.first_stage.encoder_spec.name for r in results)
    assert 0 < first < 60
    url = f"sqlite:///{tmp_path / 'log.db'}"
    now = dt.datetime.now(dt.UTC)
    with DecisionLog(url, salt="s") as dlog:
        for i, (r, res) in enumerate(zip(rows, results, strict=True)):
            dlog.record(DecisionRecord(
                decision_id=f"d{i}", created_at=now, profile="default", tier=res.choice.tier, model=res.choice.model,
                tier_index=res.choice.tier_index, scores=(), reason=res.choice.reason, model_version=res.model_version,
                embedding=encode_embedding(res.embedding), prompt_hash=dlog.hash_prompt(r["prompt"]),
                input_tokens=res.input_tokens, prompt_chars=len(r["prompt"]), encoder=res.encoder,
            ))
        for i in range(5):  # embedded by an encoder this version does not have: left out
            dlog.record(DecisionRecord(
                decision_id=f"x{i}", created_at=now, profile="default", tier="budget", model="m", tier_index=0,
                scores=(), reason="classifier", model_version="another", embedding=encode_embedding(np.ones(64)),
                prompt_hash=dlog.hash_prompt(str(i)), input_tokens=5, prompt_chars=20, encoder="another-encoder",
            ))
    profiles = _profiles_copy(tmp_path)
    code = C.main(["--profile", "default", "--from-log", url, "--log-profile", "default", "--share", "frontier=0.2",
                   "--profiles", str(profiles), "--out", str(tmp_path / "out"), "--write"])
    assert code == 0
    out = capsys.readouterr().out
    assert "on 260 prompts" in out  # the other encoder's 5 left out, not a crash
    assert f"each logged decision scored by the stage that made it (the main encoder {(260 - first) / 260:.1%}" in out
    written = load_profiles(profiles)["default"]
    assert written.calibrated is not None
    assert written.calibrated["prompts"] == "decision log (265 decisions of profile default)"
    assert written.mode == "share" and written.floors is not None and len(written.floors) == 3
    assert written.calibrated["shares"][2] == pytest.approx(0.2, abs=0.006)


def test_a_cascade_profile_is_calibrated_as_it_is_served(tmp_path: Path) -> None:
    """With cascade_margin on a two-stage version, each prompt is decided by the stage that is
    sure of it, and which one that is depends on the floors being calibrated: calibrate meets the
    target on the scores as served, and the engine's own decisions land there too."""
    from router.engine import RouteQuery
    from tests.unit.test_cascade import assemble

    data_dir = require_data()
    prompts = C.read_prompts([data_dir / "mmlu.jsonl.gz", data_dir / "alpaca_eval.jsonl.gz"], limit=None)
    prompts = prompts.subset(np.array([D.prompt_fold(t, 20) == 7 for t in prompts.texts]))  # ~740 prompts
    model = load_model(assemble(tmp_path), device="cpu", intra_op_threads=0)
    base = C.load_target(PROFILES, "capped-frontier", {})
    profile = C.with_fields(base, {"cascade_margin": 0.02})
    calibrated, result = C.run(profile, prompts, model, None, None)
    n = len(prompts)
    assert abs(result["result"]["shares"][2] - 0.2) <= 2 / n, result["result"]
    assert 0.0 < result["cascade"]["main_share"] < 1.0 and result["cascade"]["margin"] == 0.02
    engine = RoutingEngine(model)
    # the main stage alone would put the floor elsewhere: the cascade is what was calibrated
    assert calibrated.floors != tuple(C.calibrate(base, C.score(engine, base, prompts))["floors"])
    served = engine.route_batch([RouteQuery(t, calibrated, k, c)
                                 for t, k, c in zip(prompts.texts, prompts.keep, prompts.contexts, strict=True)])
    assert {r.cascade for r in served} == {"first", "main"}
    assert abs(np.mean([r.choice.tier == "frontier" for r in served]) - 0.2) <= 0.02
