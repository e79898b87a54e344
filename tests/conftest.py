"""Shared fixtures: repo paths and the shipped default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
PROFILES = REPO / "config" / "profiles.toml"
DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from router.artifacts import resolve_model_dir

    return resolve_model_dir(MODELS)


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path):  # type: ignore[no-untyped-def]
    from router.artifacts import load_model

    return load_model(model_dir, device="cpu", intra_op_threads=1)


def plain_profiles(directory: Path) -> Path:
    """The shipped profiles file (and its price catalog) in `directory`, without `cascade_margin`:
    every profile runs the main encoder alone, on any version."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROFILES.parent / "prices.toml", directory / "prices.toml")
    lines = PROFILES.read_text("utf-8").splitlines(keepends=True)
    out = directory / "profiles.toml"
    out.write_text("".join(line for line in lines if not line.startswith("cascade_margin")), "utf-8")
    return out


def require_data() -> Path:
    if not (DATA_DIR / "mmlu.jsonl.gz").is_file():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR
