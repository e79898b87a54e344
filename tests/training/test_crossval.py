"""The evaluation harness at small size: every protocol runs, writes JSON and plots, and is tracked."""

import json

import pytest

pytest.importorskip("torch")

from tests.conftest import MODELS, require_data  # noqa: E402
from training.crossval import EvalConfig, evaluate, table  # noqa: E402


@pytest.mark.parametrize("protocol", ["cv", "subjects", "cross"])
def test_protocols_report_router_and_baselines(tmp_path, monkeypatch, protocol):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = EvalConfig(
        protocol=protocol,
        k_folds=2,
        limit=300,
        steps=20,
        out_dir=str(tmp_path),
        data_dir=str(require_data()),
        knn_k=5,
        track=protocol == "cv",
        encoder_dir=str(MODELS / "encoder" / "all-MiniLM-L6-v2-int8"),
    )
    result = evaluate(cfg)
    out = tmp_path / f"{protocol}-routellm-pair"
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["pairs"] and saved["pairs"][0]["routers"].keys() >= {
        "router_gain",
        "router_floor",
        "knn",
        "random",
        "prompt_length",
        "oracle",
    }
    datasets = {p["dataset"] for p in saved["pairs"]}
    if protocol == "cross":
        assert {"mmlu", "alpaca_eval_binary"} <= datasets
    for p in saved["pairs"]:
        assert (out / p["plot"]).stat().st_size > 10_000
        assert 0 <= p["at_profile_threshold"]["strong_share"] <= 1
    assert "APGR" in table(result)
    if cfg.track:
        from mlflow import MlflowClient

        runs = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").search_runs(
            [
                MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
                .get_experiment_by_name("tier-router")
                .experiment_id
            ]
        )
        assert any(k.endswith("router_gain.apgr") for k in runs[0].data.metrics)
