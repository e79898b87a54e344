"""MLflow tracking and registry: the only module that imports mlflow."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "tier-router"
REGISTERED_MODEL = "tier-router"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an SQLite store in the repo (git-ignored)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlflow.db'}"


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, int | float) and math.isfinite(float(value)):
        out[prefix] = float(value)


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Nested figures -> MLflow metric names (`mmlu.router_gain.apgr`); non-numbers dropped."""
    out: dict[str, float] = {}
    _flatten("", metrics, out)
    # MLflow allows alphanumerics, _ - . space : / in names
    return {re.sub(r"[^\w\-.:/]", "_", k): v for k, v in out.items()}


class Run:
    """A thin handle on the active MLflow run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        import mlflow

        flat = flatten_metrics(metrics)
        if flat:
            mlflow.log_metrics(flat)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_text(json.dumps(data, indent=2, default=str), name)


@contextmanager
def run(name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[Run]:
    """Start an MLflow run in the project's experiment; params are the resolved config."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=name, tags=dict(tags or {})) as active:
        flat = {k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in params.items()}
        mlflow.log_params(flat)
        yield Run(active.info.run_id)
    log.info("MLflow run %s (%s) in %s", active.info.run_id, name, tracking_uri())


def register(run_id: str, artifact_path: str, version: str, description: str = "") -> str:
    """Register the run's model artifacts as a new version of REGISTERED_MODEL, tagged with
    the manifest's version; returns the registry's version number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    try:
        client.create_registered_model(REGISTERED_MODEL)
    except MlflowException as e:
        if "already exists" not in str(e).lower():
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = client.create_model_version(
        REGISTERED_MODEL,
        source=source,
        run_id=run_id,
        tags={"manifest_version": version},
        description=description,
    )
    return str(mv.version)
