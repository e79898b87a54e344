"""Settings: the one frozen, validated configuration object (CLI flags > env ROUTER_* > defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Everything the server needs, validated once at start-up and then passed whole.

    Each field can be set by a CLI flag (`python -m router serve --help`) or an
    environment variable `ROUTER_<FIELD>` (e.g. `ROUTER_PORT=50052`).
    """

    model_config = SettingsConfigDict(env_prefix="ROUTER_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(
        50051, ge=0, le=65535, description="Port to listen on; 0 picks a free port."
    )
    model_dir: Path = Field(
        REPO_ROOT / "models",
        description="Model version directory (manifest.json, encoder.onnx, head.onnx), or a "
        "models root whose DEFAULT file names the version.",
    )
    profiles_path: Path = Field(
        REPO_ROOT / "config" / "profiles.toml",
        description="TOML file with the deployment profiles.",
    )
    profiles_reload_seconds: float = Field(
        2.0, ge=0, description="How often to check the profiles file (and its price catalog) for changes; "
        "0 = only on SIGHUP.",
    )
    default_profile: str = Field(
        "default", description="Profile used when a request names none."
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Most requests the engine runs in one forward pass."
    )
    max_batch_tokens: int = Field(
        8192,
        ge=256,
        description="Most padded tokens (batch x longest prompt) in one forward pass.",
    )
    max_queue: int = Field(
        1024,
        ge=1,
        description="Requests waiting for the engine; beyond this, Route answers "
        "RESOURCE_EXHAUSTED at once.",
    )
    max_batch_request: int = Field(
        256, ge=1, description="Most requests one RouteBatch call may carry."
    )
    route_on_loop: bool = Field(
        True, description="A Route call that finds the server quiet (engine idle, nothing else "
        "ready on the event loop) is routed on the loop, without the hand-off to the engine "
        "thread; false: every call goes through the batcher.",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Execution provider: auto uses CUDA when available, else CPU."
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM/SIGINT, time given to in-flight calls to finish."
    )
    metrics_port: int = Field(
        9464, ge=-1, le=65535,
        description="Port of the Prometheus /metrics endpoint (on host); 0 picks a free port, "
        "-1 disables it.",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    decision_log_url: str = Field(
        "",
        description="Database of decisions and outcomes (SQLAlchemy URL): empty = SQLite var/decisions.db "
        "under the repo; postgresql+psycopg://... to share one log between replicas; 'off' = no log "
        "(ReportOutcome then answers UNAVAILABLE).",
    )
    outcome_wait_seconds: float = Field(
        1.0, ge=0, le=30,
        description="How long ReportOutcome keeps looking for a decision it cannot find yet before "
        "answering NOT_FOUND: replicas sharing a log commit their decisions in the background (within "
        "about 0.2 s), so an outcome sent to another replica can arrive first. 0 = answer at once.",
    )
    decision_log_salt: str = Field(
        "",
        description="Secret salt of the prompt hashes in the log; empty = a random one kept in "
        "var/decision-log.salt. Replicas sharing a log must share the salt.",
        repr=False,
    )
    model_reload_seconds: float = Field(
        2.0, ge=0, description="How often to check models/DEFAULT for a newly promoted version (when "
        "model_dir is a models root); 0 = only on SIGHUP.",
    )
    shadow_model_dir: Path | None = Field(
        None, description="A candidate model version that scores live requests beside the served one "
        "without changing answers; disagreement and tier-share shift go to /metrics.",
    )
    drift_window: int = Field(
        1000, ge=10, description="Decisions per profile in the rolling window of live tier shares."
    )
