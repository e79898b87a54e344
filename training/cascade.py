"""`python -m training add-cascade`: give an existing model version a cascade stage, its main stage unchanged.

`make train-cascade` fits both stages anew. This keeps a version's encoder and head byte for
byte (so profiles without `cascade_margin` decide exactly as before) and fits only the first
stage, with the version's own training config, data and folds, on another encoder's embeddings
(the static one, `make model-static`). The result is a new version named after its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from router.artifacts import DEFAULT_POINTER, MANIFEST, load_model, resolve_model_dir
from training import data as D
from training.fit import (
    ALGORITHM,
    PATH_FIELDS,
    REPO,
    FitConfig,
    build_terms,
    encoder_licenses,
    fit_cascade,
    portable_config,
    write_stage,
)

log = logging.getLogger(__name__)


def source_config(manifest: dict[str, Any], data_dir: Path | None) -> FitConfig:
    """The FitConfig a version was trained with (its manifest's record), data from `data_dir`
    when given, else from where the record says (relative to the repository's parent)."""
    recorded = manifest.get("training", {}).get("config")
    if not recorded:
        raise ValueError(f"model {manifest['version']}: the manifest has no training config to fit the same way")
    known = {f.name for f in dataclasses.fields(FitConfig)}
    # the record's paths are relative to the repository's parent (portable_config): back to absolute
    kwargs: dict[str, Any] = {k: v for k, v in recorded.items() if k in known}
    for k in PATH_FIELDS:
        if kwargs.get(k) and not Path(kwargs[k]).is_absolute():
            kwargs[k] = str(REPO.parent / kwargs[k])
    cfg = FitConfig(**kwargs)
    where = Path(cfg.data_dir)
    return dataclasses.replace(cfg, data_dir=str(data_dir or (where if where.is_dir() else D.DATA_DIR)))


def add_cascade(
    source: Path,
    cascade_encoder_dir: Path,
    *,
    data_dir: Path | None = None,
    models_dir: Path | None = None,
    version: str = "",
    set_default: bool = False,
    track: bool = True,
) -> dict[str, Any]:
    src = resolve_model_dir(source)
    manifest = json.loads((src / MANIFEST).read_text("utf-8"))
    if manifest.get("cascade"):
        raise ValueError(f"model {manifest['version']} already has a cascade stage")
    cfg = dataclasses.replace(source_config(manifest, data_dir), cascade_encoder_dir=str(cascade_encoder_dir))
    data = D.load(cfg.datasets, Path(cfg.data_dir), cfg.limit)
    if D.data_hash(data.files) != manifest["training"].get("data_sha256"):
        raise ValueError(
            f"{cfg.data_dir}: not the data model {manifest['version']} was trained on (sha256 differs); "
            "the first stage must learn from the same prompts and folds"
        )
    if data.models != manifest["head"]["models"]:
        raise ValueError(f"model {manifest['version']} scores {manifest['head']['models']}, the data {data.models}")
    stage, metrics = fit_cascade(cfg, data, build_terms(data), D.folds(data.prompts, cfg.k_folds))

    digest = hashlib.sha256(f"{manifest['version']};{stage.encoder_meta['sha256']};a{ALGORITHM}".encode())
    name = version or f"{manifest['version']}-c{digest.hexdigest()[:8]}"
    root = Path(models_dir) if models_dir is not None else src.parent

    def publish(run_id: str | None) -> Path:
        out = root / name
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        first = write_stage(
            tmp, "cascade", stage.encoder_dir, stage.encoder_meta, stage.head, stage.X, data, cfg, stage.tokens
        )
        new = dict(manifest)
        new["version"] = name
        new["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        new["cascade"] = first
        new["licenses"] = manifest.get("licenses", {}) | encoder_licenses(stage.encoder_meta, "cascade encoder")
        new["metrics"] = manifest.get("metrics", {}) | {"cascade_first_stage": metrics}
        new["training"] = manifest["training"] | {
            "cascade": {"added_to": manifest["version"], "config": portable_config(cfg)}
        }
        new["mlflow_run_id"] = run_id or manifest.get("mlflow_run_id")
        (tmp / MANIFEST).write_text(json.dumps(new, indent=2) + "\n", "utf-8")
        load_model(tmp, device="cpu")  # refuse to publish what the server would refuse to load
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        if set_default:
            (root / DEFAULT_POINTER).write_text(name + "\n", "utf-8")
        return out

    if not track:
        out = publish(None)
        return {"out_dir": str(out), "source": manifest["version"], "metrics": metrics}

    from training import tracking

    params = portable_config(cfg) | {"source_version": manifest["version"]}
    with tracking.run("add-cascade", params, {"kind": "add-cascade"}) as run:
        out = publish(run.run_id)
        run.log_metrics({"cascade_first_stage": metrics})
        run.log_artifact(out, "model")
        registry_version = tracking.register(run.run_id, "model", out.name, f"models/{out.name} (cascade added)")
    return {
        "out_dir": str(out), "source": manifest["version"], "metrics": metrics,
        "mlflow_run_id": run.run_id, "registry_version": registry_version,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training add-cascade", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", type=Path, default=REPO / "models",
                   help="a model version, or models/ (its DEFAULT) (default: %(default)s)")
    p.add_argument("--cascade-encoder-dir", type=Path, required=True,
                   help="the first stage's encoder (`make model-static` writes the static one)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the shared data (default: where the version's record says)")
    p.add_argument("--models-dir", type=Path, default=None, help="where to write (default: beside the source)")
    p.add_argument("--version", default="", help="name of the new version (default: <source>-c<hash>)")
    p.add_argument("--set-default", action="store_true", help="point DEFAULT at the new version")
    p.add_argument("--no-track", dest="track", action="store_false", help="skip MLflow")
    args = p.parse_args(argv)
    try:
        result = add_cascade(args.source, args.cascade_encoder_dir, data_dir=args.data_dir,
                             models_dir=args.models_dir, version=args.version, set_default=args.set_default,
                             track=args.track)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
