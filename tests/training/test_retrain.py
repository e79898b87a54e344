"""Retrain from a decision log at small size: real prompts and labels, a tmp models root and MLflow store."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from router.artifacts import load_model, read_manifest  # noqa: E402
from router.decisionlog import (  # noqa: E402
    DecisionLog,
    DecisionRecord,
    LabeledDecisions,
    OutcomeRecord,
    TierScore,
    encode_embedding,
)
from router.profiles import Profile, Rule, Tier  # noqa: E402
from tests.conftest import MODELS, require_data  # noqa: E402
from training import data as D  # noqa: E402
from training.embed import Embedder  # noqa: E402
from training.fit import FitConfig, fit  # noqa: E402
from training.retrain import (  # noqa: E402
    GATE_RULE,
    LoggedContext,
    describe_policy,
    gate,
    logged_words,
    main,
    off_policy,
    policy_choices,
    run_onnx_head,
    seen_prompts,
    time_split,
)

ENCODER = MODELS / "encoder" / "all-MiniLM-L6-v2-int8"
FIRST_STAGE = MODELS / "encoder" / "all-MiniLM-L6-v2-first2-int8"  # any cheaper encoder can be one
BASE_LIMIT = 800  # base rows (MMLU only): about 80 held-out prompts for APGR
WEAK, STRONG = "mixtral-8x7b-instruct-v0.1", D.REFERENCE_MODEL
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def write_log(url: str, data_dir: Path, model_version: str, n: int = 400, seed: int = 0,
              encoder_dir: Path = ENCODER, encoder: str = "", prefix: str = "d") -> None:
    """n decisions on real MMLU prompts the base data leaves out (random subjects), a strong/weak pair, with the
    real label of the chosen model as the outcome. The newer half explores (epsilon 0.5). Embedded by
    `encoder_dir`, logged as made by `encoder` ("": unnamed, as before the log named encoders)."""
    rng = np.random.default_rng(seed)
    rest = D.read_jsonl(data_dir / "mmlu.jsonl.gz")[BASE_LIMIT:]
    records = [rest[i] for i in rng.choice(len(rest), n, replace=False)]  # the file is sorted by subject
    prompts = [str(r["prompt"]) for r in records]
    meta = json.loads((encoder_dir / "encoder.json").read_text())
    emb = Embedder(encoder_dir / "encoder.onnx", encoder_dir / "tokenizer.json", int(meta["max_tokens"])).embed(prompts)
    with DecisionLog(url, salt="test-salt") as log:
        for i, (rec, text) in enumerate(zip(records, prompts, strict=True)):
            greedy = int(len(text) > 400)  # long prompts go to the strong tier
            explore = i >= n // 2
            tier = int(rng.integers(2)) if explore and rng.random() < 0.5 else greedy
            propensity = (0.75 if tier == greedy else 0.25) if explore else 1.0
            model = (WEAK, STRONG)[tier]
            log.record(
                DecisionRecord(
                    decision_id=f"{prefix}{i:04d}",
                    request_id=f"r{prefix}{i:04d}",
                    created_at=T0 + dt.timedelta(minutes=i),
                    profile="routellm-pair",
                    tier=("weak", "strong")[tier],
                    model=model,
                    tier_index=tier,
                    scores=(
                        TierScore(tier="weak", model=WEAK, quality=0.6, win_probability=0.5),
                        TierScore(tier="strong", model=STRONG, quality=0.8, win_probability=0.6),
                    ),
                    reason="exploration" if explore else "classifier",
                    model_version=model_version,
                    propensity=propensity,
                    prompt_chars=len(text),
                    prompt_hash=log.hash_prompt(text),
                    embedding=encode_embedding(emb[i]),
                    encoder=encoder,
                )
            )
            label = float(rec["outcomes"][model])  # type: ignore[index]
            log.report_outcome(OutcomeRecord(decision_id=f"{prefix}{i:04d}", success=label > 0.5, cost_usd=0.001))


def flipped_mmlu(data_dir: Path, out_dir: Path) -> Path:
    """A copy of the base MMLU rows with every outcome inverted: a live model trained on it is
    confidently wrong, so a candidate trained on the real labels must beat it on every check."""
    out_dir.mkdir()
    rows = D.read_jsonl(data_dir / "mmlu.jsonl.gz")[:BASE_LIMIT]
    with gzip.open(out_dir / "mmlu.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows:
            flipped = {m: 1.0 - float(y) for m, y in r["outcomes"].items()}  # type: ignore[attr-defined]
            f.write(json.dumps(r | {"outcomes": flipped}) + "\n")
    return out_dir


def test_retrain_promotes_a_candidate_that_beats_the_live_model(tmp_path, monkeypatch, capsys):
    data_dir = require_data()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    models = tmp_path / "models"
    live_cfg = FitConfig(
        datasets=["mmlu"], data_dir=str(flipped_mmlu(data_dir, tmp_path / "flipped")), encoder_dir=str(ENCODER),
        models_dir=str(models), limit=BASE_LIMIT, steps=30, track=False, cascade_encoder_dir=str(FIRST_STAGE),
    )  # fmt: skip
    live = Path(fit(live_cfg)["out_dir"])  # with a cascade stage, which a retrain must keep
    live_cascade = read_manifest(live).cascade
    assert live_cascade is not None and live_cascade.encoder.name == "all-MiniLM-L6-v2-first2"
    url = f"sqlite:///{tmp_path}/decisions.db"
    write_log(url, data_dir, live.name)
    args = [
        "--from-log", url, "--models-dir", str(models), "--data-dir", str(data_dir), "--encoder-dir", str(ENCODER),
        "--datasets", "mmlu", "--limit", str(BASE_LIMIT), "--steps", "30", "--min-outcomes", "100",
        "--holdout-frac", "0.25",
    ]  # fmt: skip

    # a dry run compares and prints the gate, and writes nothing
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert GATE_RULE in out and "held out the newest 100" in out and "IPS success rate" in out
    assert (models / "DEFAULT").read_text().strip() == live.name
    assert sorted(p.name for p in models.iterdir()) == sorted(["DEFAULT", live.name])
    assert not (tmp_path / "mlflow.db").exists()

    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["promoted"] is True and summary["live_version"] == live.name, out
    new = models / summary["candidate_version"]
    assert Path(summary["out_dir"]) == new and (models / "DEFAULT").read_text().strip() == new.name
    manifest = read_manifest(new)
    window = manifest.model_extra["training"]["decision_log"]  # type: ignore[index]
    assert window["outcomes_trained"] == 300 and window["outcomes_held_out"] == 100
    assert window["live_version"] == live.name and "decision_log" in manifest.metrics
    assert manifest.cascade == live_cascade  # the live first stage, unchanged
    assert load_model(new, device="cpu").first_stage is not None  # servable, cascade included
    print(out)  # shown with -s: the comparison and the gate

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    logged = {"candidate.decision_log.log_loss", "live.decision_log.log_loss", "candidate.decision_log.ips.success_ips"}
    assert logged <= set(run.data.metrics) and run.data.metrics["candidate.base.mmlu_routing.router_floor.apgr"] > 0
    assert run.data.tags["promoted"] == "true" and run.data.params["from_log"] == url
    (mv,) = client.search_model_versions("name='tier-router'")
    assert mv.tags["manifest_version"] == new.name


def test_retrain_refits_a_cascade_first_stage_on_the_decisions_it_made(tmp_path, capsys):
    """Outcomes of decisions the first stage made carry its encoder's embeddings: they refit that
    stage (the main head never sees them), and the gate checks it on its own held-out decisions."""
    data_dir = require_data()
    models = tmp_path / "models"
    live_cfg = FitConfig(
        datasets=["mmlu"], data_dir=str(flipped_mmlu(data_dir, tmp_path / "flipped")), encoder_dir=str(ENCODER),
        models_dir=str(models), limit=BASE_LIMIT, steps=30, track=False, cascade_encoder_dir=str(FIRST_STAGE),
    )  # fmt: skip
    live = Path(fit(live_cfg)["out_dir"])
    live_cascade = read_manifest(live).cascade
    assert live_cascade is not None
    url = f"sqlite:///{tmp_path}/decisions.db"
    write_log(url, data_dir, live.name, n=300, encoder="all-MiniLM-L6-v2")
    write_log(url, data_dir, live.name, n=300, seed=1, encoder_dir=FIRST_STAGE, encoder=live_cascade.encoder.name,
              prefix="f")  # fmt: skip
    args = [
        "--from-log", url, "--models-dir", str(models), "--data-dir", str(data_dir), "--encoder-dir", str(ENCODER),
        "--datasets", "mmlu", "--limit", str(BASE_LIMIT), "--steps", "30", "--min-outcomes", "100",
        "--holdout-frac", "0.25", "--no-track",
    ]  # fmt: skip

    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["promoted"] is True, out
    assert "cascade first stage (all-MiniLM-L6-v2-first2), refitted on the 225 older outcomes" in out
    assert sum("] first stage: " in line for line in out.splitlines()) == 2, out  # its log loss and ECE checks
    manifest = read_manifest(Path(summary["out_dir"]))
    window = manifest.model_extra["training"]["decision_log"]  # type: ignore[index]
    assert window["outcomes_trained"] == 225 and window["outcomes_held_out"] == 75  # the main encoder's 300
    assert window["first_stage"] == {"encoder": "all-MiniLM-L6-v2-first2", "outcomes_trained": 225,
                                     "outcomes_held_out": 75}  # fmt: skip
    assert manifest.cascade is not None and manifest.cascade.encoder == live_cascade.encoder
    assert manifest.cascade.head.sha256 != live_cascade.head.sha256  # a new first-stage head
    assert "first_stage_decision_log" in manifest.metrics
    assert load_model(Path(summary["out_dir"]), device="cpu").first_stage is not None

    # with too few outcomes in each stage nothing is fitted, and the reason counts both
    args_400 = [*args[: args.index("--min-outcomes") + 1], "400", *args[args.index("--min-outcomes") + 2 :]]
    assert main(args_400) == 0
    reason = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reason"]
    assert reason == ("300 logged outcomes of the main encoder's decisions and 300 of the cascade first stage's, "
                      "each fewer than --min-outcomes 400")  # fmt: skip

    # a first stage with enough outcomes learns even where the main encoder decided too few: the
    # main head is refitted on the base data alone, its log checks skipped
    few = f"sqlite:///{tmp_path}/few-main.db"
    write_log(few, data_dir, live.name, n=60, encoder="all-MiniLM-L6-v2")
    write_log(few, data_dir, live.name, n=300, seed=1, encoder_dir=FIRST_STAGE, encoder=live_cascade.encoder.name,
              prefix="f")  # fmt: skip
    assert main([*args[:1], few, *args[2:], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[skip] main head: too few logged outcomes of its own" in out, out
    assert sum("] first stage: " in line for line in out.splitlines()) == 2, out
    assert "main head: too few logged outcomes of its own decisions; refitted on the base data alone" in out

    # without its encoder the stage is kept as it was, and said so
    assert main([*args, "--dry-run", "--cascade-encoder-dir", str(ENCODER)]) == 0
    out = capsys.readouterr().out
    assert "cascade first stage kept unchanged" in out and "is another encoder" in out


def test_too_few_outcomes_fit_nothing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/decisions.db"
    DecisionLog(url).close()
    assert main(["--from-log", url, "--models-dir", str(tmp_path), "--min-outcomes", "10"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["promoted"] is False and "fewer than --min-outcomes 10" in summary["reason"]


def figures(log_loss: float, ece: float, apgr: float | None) -> dict:
    out: dict = {"decision_log": {"log_loss": log_loss, "ece": ece}}
    if apgr is not None:
        out["base"] = {"mmlu_routing": {"router_floor": {"apgr": apgr}}}
    return out


@pytest.mark.parametrize(
    ("candidate", "promote"),
    [
        (figures(0.501, 0.03, 0.59), True),  # within every slack
        (figures(0.503, 0.02, 0.70), False),  # log loss worse by more than 0.002
        (figures(0.40, 0.061, 0.70), False),  # ECE above max(live + 0.01, 0.05)
        (figures(0.40, 0.049, 0.70), True),  # ECE under the 0.05 ceiling
        (figures(0.40, 0.02, 0.579), False),  # APGR down by more than 0.01
        (figures(math.nan, 0.02, 0.70), False),  # a NaN never passes
        (figures(0.40, 0.02, None), True),  # no base APGR: that check is skipped
    ],
)
def test_the_gate(candidate, promote):
    live = figures(0.500, 0.04, 0.59)
    ok, lines = gate(candidate, live)
    assert ok is promote, lines
    assert len(lines) == 3 and all(line.startswith(("[pass]", "[FAIL]", "[skip]")) for line in lines)


def test_the_gate_allows_an_ece_within_sampling_noise():
    """On few held-out outcomes a calibrated head's ECE is large by chance alone: the gate's ECE bar
    is at least the 95th percentile of that noise (logged_metrics' ece_noise95)."""
    live = figures(0.500, 0.04, 0.59)
    noisy = figures(0.49, 0.08, 0.59)
    assert gate(noisy, live)[0] is False  # above max(0.04 + 0.01, 0.05) with no noise figure
    noisy["decision_log"]["ece_noise95"] = 0.10
    ok, lines = gate(noisy, live)
    assert ok and "noise 0.1000" in lines[1]
    noisy["decision_log"]["ece"] = 0.11
    assert gate(noisy, live)[0] is False


@pytest.mark.parametrize(("first_stage", "promote"), [({"log_loss": 0.601, "ece": 0.03}, True),
                                                      ({"log_loss": 0.61, "ece": 0.03}, False)])
def test_the_gate_checks_a_refitted_first_stage(first_stage, promote):
    live = figures(0.500, 0.04, 0.59) | {"first_stage": {"log_loss": 0.600, "ece": 0.04}}
    ok, lines = gate(figures(0.500, 0.04, 0.59) | {"first_stage": first_stage}, live)
    assert ok is promote, lines
    assert len(lines) == 5 and sum(" first stage: " in line for line in lines) == 2


def test_time_split_holds_out_the_newest():
    train, held = time_split(10, 0.2)
    assert train.tolist() == list(range(8)) and held.tolist() == [8, 9]
    assert len(time_split(3, 0.9)[0]) == 1  # something is always left to train on


def labeled_decisions(profiles: list[str], tier_index: list[int]) -> LabeledDecisions:
    """Logged decisions of a weak/strong pair, all exploring (propensity 0.5), every outcome a success."""
    n = len(profiles)
    scores = (
        TierScore(tier="weak", model=WEAK, quality=0.0, win_probability=0.5),
        TierScore(tier="strong", model=STRONG, quality=0.0, win_probability=0.5),
    )
    return LabeledDecisions(
        decision_id=[f"d{i}" for i in range(n)], created_at=np.array([T0.replace(tzinfo=None)] * n, "datetime64[us]"),
        profile=profiles, model_version=["v"] * n, model=[(WEAK, STRONG)[t] for t in tier_index],
        tier_index=np.array(tier_index, np.int64), scores=[scores] * n, propensity=np.full(n, 0.5),
        embedding=np.zeros((n, 4), np.float32), prompt_chars=np.full(n, 100, np.float32),
        success=np.ones(n, np.float32), score=np.full(n, np.nan, np.float32), outcome=np.ones(n, np.float32),
        rework=np.zeros(n, bool), cost_usd=np.zeros(n), prompt=[""] * n,
    )  # fmt: skip


def test_off_policy_replays_the_logged_profile_and_falls_back_without_it():
    tiers = (Tier(name="weak", model=WEAK), Tier(name="strong", model=STRONG))
    profiles = {
        "high": Profile(name="high", floor=0.7, tiers=tiers, version="p1"),
        "legal": Profile(name="legal", floor=0.5, tiers=tiers, version="p2",
                         rules=(Rule(name="legal-strong", workflow="legal", pin_tier="strong"),)),
    }  # fmt: skip
    logged = labeled_decisions(["high", "gone", "legal", "legal"], [1, 1, 1, 1])
    context = {"d2": LoggedContext(profile_version="p2", workflow="legal"), "d3": LoggedContext(profile_version="p0")}
    # every row: weak quality 0.6, strong 0.9
    ability = np.tile(np.log(np.array([0.6 / 0.4, 0.9 / 0.1], np.float32)), (4, 1))
    difficulty = np.zeros(4, np.float32)
    col = {WEAK: 0, STRONG: 1}
    choice, used = policy_choices(ability, difficulty, col, logged, [0, 1, 2, 3], 0.5, profiles, context)
    # high: floor 0.7 -> strong; gone: stand-in at 0.5 -> weak; legal: the workflow rule pins strong; else weak
    assert choice.tolist() == [1, 0, 1, 0]
    assert used["decide"] == 3 and used["stand_in"] == 1 and used["profile_version_changed"] == 1
    assert used["profiles"]["gone"].startswith("stand-in (1: not in the profiles file")
    ips = off_policy(ability, difficulty, col, logged, 0.5, profiles, context)
    assert ips is not None and ips["agreement"] == 0.5 and ips["success_ips"] == 1.0  # 2 of 4 agree, weight 2
    assert "stand-in rule (cheapest logged tier clearing 0.5) for 1" in describe_policy(ips)
    assert off_policy(ability, difficulty, col, logged, 0.5)["policy"]["stand_in"] == 4  # type: ignore[index]


def test_base_figures_leave_out_prompts_the_candidate_learned_from_the_log():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    prompts = ["a" * 10, "b" * 10, "c" * 12, "d" * 12]
    prep = SimpleNamespace(data=SimpleNamespace(prompts=prompts), fold=np.array([0, 0, 0, 1]),
                           X=np.hstack([emb, np.zeros((4, 2), np.float32)]))  # fmt: skip
    log = labeled_decisions(["p", "p", "p"], [0, 0, 0])
    # logged: prompt 0 (float16, as the log keeps it), prompt 2 with another length, prompt 3 (not held out)
    log = dataclasses.replace(
        log, embedding=emb[[0, 2, 3]].astype(np.float16).astype(np.float32), prompt_chars=np.array([10, 11, 12.0])
    )
    assert seen_prompts(prep, log, holdout_fold=0).tolist() == [True, False, False, False]  # type: ignore[arg-type]


def test_logged_prompts_give_their_words_to_a_lexical_head_and_the_rest_none(loaded_model):
    from router.lexical import Lexicon

    logged = dataclasses.replace(
        labeled_decisions(["p", "p"], [0, 1]), prompt=["Which of the following is a prime number?", ""]
    )
    words = logged_words(logged, loaded_model.tokenizer)
    lexicon: Lexicon = loaded_model.lexicon
    index, value = lexicon.features(words.input_ids, words.lengths)
    assert (index[0] < lexicon.size).sum() > 3  # a stored prompt: its pieces and pairs
    assert (index[1] == lexicon.size).all() and (value[1] == 0).all()  # not stored: no words
    emb, chars = np.zeros((2, 384), np.float32), np.full(2, 40.0, np.float32)
    with_words = run_onnx_head(loaded_model.head, emb, chars, lexicon, words)[0]
    assert not np.allclose(with_words[0], with_words[1])
    with pytest.raises(ValueError, match="words"):
        run_onnx_head(loaded_model.head, emb, chars, lexicon)
