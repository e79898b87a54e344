"""The loop closed at small size: a real server, held-out MMLU prompts, reported outcomes, retrain, hot swap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from router.decisionlog import DecisionLog  # noqa: E402
from tests.conftest import require_data  # noqa: E402
from tests.training.test_retrain import BASE_LIMIT, ENCODER, flipped_mmlu  # noqa: E402
from training import data as D  # noqa: E402
from training.demo_loop import DemoConfig, held_out_prompts, main, phase_figures  # noqa: E402
from training.fit import FitConfig, fit  # noqa: E402

N = 120  # prompts per phase


def test_the_loop_at_small_size(tmp_path, monkeypatch, capsys):
    """The live model is a deliberately bad one (trained on inverted labels), so that the candidate,
    trained on the real ones, usually beats it and the hot-swap path runs; the checks follow
    whichever way the gate went."""
    data_dir = require_data()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo must point MLflow at its work dir itself
    models = tmp_path / "models"
    live_cfg = FitConfig(
        datasets=["mmlu"], data_dir=str(flipped_mmlu(data_dir, tmp_path / "flipped")), encoder_dir=str(ENCODER),
        models_dir=str(models), limit=BASE_LIMIT, steps=30, track=False,
    )  # fmt: skip
    live = Path(fit(live_cfg)["out_dir"]).name
    work = tmp_path / "work"
    retrain_args = f"--datasets mmlu --limit {BASE_LIMIT} --steps 30 --encoder-dir {ENCODER}"
    argv = ["--n", str(N), "--keep", str(work), "--models-dir", str(models), "--retrain-args", retrain_args]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((work / "result.json").read_text())
    print(out)  # shown with -s: the retrain report and the table

    # every decision logged, every outcome acknowledged and stored; exploration logged its propensities
    assert result["log"] == {"decisions": 2 * N, "outcomes": 2 * N}
    for phase in ("phase1", "phase2"):
        p = result[phase]
        assert p["acknowledged"] == N and p["logged"] == N, p
        assert p["propensity_below_1"] == N and 0.0 < p["propensity_min"] < 1.0, p  # two tiers, rate 0.1
    labels = {str(r["id"]): r["outcomes"] for r in D.read_jsonl(data_dir / "mmlu.jsonl.gz")}
    with DecisionLog(f"sqlite:///{work / 'decisions.db'}") as log:
        decisions = list(log.iter_decisions())
        for d in decisions:  # the outcome reported is the data's label of the model the server chose
            outcome = log.outcome(d.decision_id)
            assert outcome is not None and outcome.success == (labels[d.request_id][d.model] >= 0.5)  # type: ignore[index]
    assert {d.profile for d in decisions} == {"demo"} and all(0 < d.propensity < 1 for d in decisions)
    assert any(d.reason == "exploration" for d in decisions)

    # retrain ran on the log and printed its gate
    assert "gate: promote iff" in out and len(result["retrain"]["gate"]) == 3
    assert "router.policy.decide with the logged profile" in out  # IPS replays the demo profile
    summary = result["retrain"]["summary"]
    assert summary["live_version"] == live and result["phase1"]["versions"] == [live]

    # the consequence of whichever way the gate went
    versions = {d.model_version for d in decisions}
    if result["promoted"]:
        new = summary["candidate_version"]
        assert new != live and (work / "models" / new / "manifest.json").is_file()
        assert result["default_after"] == new and result["served_version_after"] == new
        assert result["phase2"]["versions"] == [new] and versions == {live, new}  # swapped, no restart
        assert "old_policy" in result["phase2"] and (work / "mlflow.db").is_file()
        assert f"server swapped {live} -> {new}" in out
    else:
        assert result["default_after"] == live and result["phase2"]["versions"] == [live] and versions == {live}
        assert "not promoted" in out
    assert result["server_exit_code"] == 0 and result["repo_default_unchanged"]
    assert (models / "DEFAULT").read_text().strip() == live  # the source root is only read


def test_phases_are_disjoint_held_out_prompts(model_dir):
    data_dir = require_data()
    cfg = DemoConfig(n=50, data_dir=str(data_dir))
    one, two, source = held_out_prompts(cfg, model_dir)
    assert len(one.ids) == len(two.ids) == 50 and not set(one.ids) & set(two.ids)
    assert all(D.prompt_fold(t, source["k_folds"]) == source["fold"] for t in one.texts + two.texts)
    with pytest.raises(SystemExit, match="at most"):
        held_out_prompts(DemoConfig(n=source["fold_prompts"], data_dir=str(data_dir)), model_dir)


def test_phase_figures():
    quality = np.array([[0.9, 0.95], [0.4, 0.8], [0.3, 0.6]], np.float32)  # floor 0.5: weak, strong, strong
    costs = np.array([[1.0, 10.0]] * 3) / 1000
    labels = np.array([[1, 1], [0, 1], [0, 0]], np.float32)
    f = phase_figures(quality, costs, labels, 0.5, served=np.array([1, 1, 0]))
    assert f["policy"] == pytest.approx({"success": 2 / 3, "strong_share": 2 / 3, "usd_per_1k": 7.0})
    assert f["served"] == pytest.approx({"success": 2 / 3, "strong_share": 2 / 3, "usd_per_1k": 7.0})
    assert f["oracle"] == pytest.approx({"success": 2 / 3, "strong_share": 1 / 3, "usd_per_1k": 4.0})
    assert f["always_weak"]["success"] == pytest.approx(1 / 3) and f["always_strong"]["usd_per_1k"] == 10.0


def test_the_demo_profile_may_cascade(tmp_path):
    """--cascade-margin puts the margin into the demo profile (a valid one); without it there is none."""
    from router.profiles import load_profiles
    from tests.conftest import plain_profiles
    from training.demo_loop import PROFILE, demo_profile

    path = plain_profiles(tmp_path)
    base = path.read_text("utf-8")
    for margin in (None, 0.02):
        path.write_text(base + demo_profile(0.6, 0.1, margin), "utf-8")
        assert load_profiles(path)[PROFILE].cascade_margin == margin
