"""`python -m training add-cascade`: a version gains a first stage; its main stage stays byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the head trains with torch (train extra)

from router.artifacts import load_model, read_manifest, sha256_file  # noqa: E402
from tests.conftest import MODELS, require_data  # noqa: E402
from training.cascade import main, source_config  # noqa: E402
from training.fit import FitConfig, fit, portable_config  # noqa: E402

MAIN = MODELS / "encoder" / "all-MiniLM-L6-v2-int8"
FIRST = MODELS / "encoder" / "all-MiniLM-L6-v2-first2-int8"  # any other encoder can be a first stage


def test_add_cascade_keeps_the_main_stage_and_registers_the_new_version(tmp_path, monkeypatch, capsys):
    data_dir = require_data()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    models = tmp_path / "models"
    src = Path(fit(FitConfig(datasets=["mmlu"], data_dir=str(data_dir), encoder_dir=str(MAIN), models_dir=str(models),
                             limit=400, steps=30, track=False))["out_dir"])
    assert main(["--from", str(models), "--cascade-encoder-dir", str(FIRST), "--data-dir", str(data_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    new = Path(result["out_dir"])
    assert new.parent == models and new.name.startswith(src.name + "-c") and result["source"] == src.name
    for name in ("encoder.onnx", "head.onnx", "tokenizer.json"):  # the main stage, unchanged
        assert sha256_file(new / name) == sha256_file(src / name)
    manifest = read_manifest(new)
    assert manifest.cascade is not None and manifest.cascade.encoder.name == "all-MiniLM-L6-v2-first2"
    assert manifest.head == read_manifest(src).head
    assert manifest.model_extra["training"]["cascade"]["added_to"] == src.name  # type: ignore[index]
    assert "cascade_first_stage" in manifest.metrics and manifest.mlflow_run_id == result["mlflow_run_id"]
    assert load_model(new, device="cpu").first_stage is not None
    assert (models / "DEFAULT").read_text().strip() == src.name  # not moved without --set-default

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (mv,) = client.search_model_versions("name='tier-router'")
    assert mv.tags["manifest_version"] == new.name

    # a second cascade on the same version is refused, and so is other data than it learned from
    assert main(["--from", str(new), "--cascade-encoder-dir", str(FIRST), "--no-track"]) == 2
    assert "already has a cascade stage" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "mmlu.jsonl.gz").write_bytes((data_dir / "alpaca_eval.jsonl.gz").read_bytes())
    assert main(["--from", str(src), "--cascade-encoder-dir", str(FIRST), "--data-dir", str(other), "--no-track"]) == 2
    assert "not the data" in capsys.readouterr().err


def test_the_recorded_config_comes_back_with_the_paths_it_was_recorded_from():
    """A manifest records paths relative to the repository's parent; read back, they are the same
    folders, and recorded again, the same strings (they used to gain the repository's name twice)."""
    cfg = FitConfig(encoder_dir=str(FIRST), models_dir=str(MODELS), cascade_encoder_dir=str(MAIN))
    recorded = portable_config(cfg)
    assert recorded["encoder_dir"] == f"{MODELS.parent.name}/models/encoder/all-MiniLM-L6-v2-first2-int8"
    back = source_config({"version": "v", "training": {"config": recorded}}, data_dir=None)
    assert (back.encoder_dir, back.models_dir, back.cascade_encoder_dir) == (str(FIRST), str(MODELS), str(MAIN))
    assert portable_config(back) | {"data_dir": ""} == recorded | {"data_dir": ""}
