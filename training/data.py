"""Labeled routing data (shared/data-style JSONL) -> one table of prompts and outcome terms, with splits."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from router.artifacts import sha256_file

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# What an outcome score means in each file, i.e. what the model's answer is compared with.
#   "bar":       absolute correctness; compared with the prompt's difficulty (MMLU)
#   "reference": P(answer beats the reference model's answer), judged (AlpacaEval)
REFERENCE_MODEL = "gpt-4-1106-preview"  # the reference of both AlpacaEval files
FILES: dict[str, dict[str, str]] = {
    "mmlu": {
        "file": "mmlu.jsonl.gz",
        "compare": "bar",
        "license": "MIT (MMLU questions); Apache-2.0 (RouteLLM labels)",
    },
    "alpaca_eval": {
        "file": "alpaca_eval.jsonl.gz",
        "compare": "reference",
        "license": "CC BY-NC 4.0 (AlpacaEval data)",
    },
    "alpaca_eval_binary": {
        "file": "alpaca_eval_binary.jsonl.gz",
        "compare": "reference",
        "license": "CC BY-NC 4.0 (AlpacaEval data)",
    },
}
PERMISSIVE = ("mmlu",)  # data sets whose license allows commercial use of a trained head


@dataclass
class RoutingData:
    """Prompts (one per row) and outcome terms in long form: term k says that on prompt
    `row[k]`, model `model[k]` scored `target[k]` against `dataset[k]`'s comparison."""

    prompts: list[str]
    ids: list[str]
    sources: list[str]
    models: list[str]  # every model seen, in first-seen order
    datasets: list[str]  # names, in the order given
    row: npt.NDArray[np.int64] = field(repr=False)
    model: npt.NDArray[np.int64] = field(repr=False)
    dataset: npt.NDArray[np.int64] = field(repr=False)
    target: npt.NDArray[np.float32] = field(repr=False)
    files: list[dict[str, object]] = field(default_factory=list)  # provenance: name, sha256, rows, license

    @property
    def n_rows(self) -> int:
        return len(self.prompts)

    def row_dataset(self) -> npt.NDArray[np.int64]:
        """(n_rows,) index of the data set each prompt row came from."""
        out = np.empty(self.n_rows, np.int64)
        out[self.row] = self.dataset
        return out

    def outcome_matrix(self, dataset: str) -> tuple[npt.NDArray[np.int64], list[str], npt.NDArray[np.float32]]:
        """Rows of one data set, its models, and the (rows, models) score matrix."""
        d = self.datasets.index(dataset)
        sel = self.dataset == d
        rows = np.unique(self.row[sel])
        model_ids = list(dict.fromkeys(self.model[sel].tolist()))
        pos = {r: i for i, r in enumerate(rows.tolist())}
        col = {m: j for j, m in enumerate(model_ids)}
        mat = np.full((len(rows), len(model_ids)), np.nan, np.float32)
        for r, m, y in zip(self.row[sel], self.model[sel], self.target[sel], strict=True):
            mat[pos[int(r)], col[int(m)]] = y
        return rows, [self.models[m] for m in model_ids], mat


def read_jsonl(path: Path) -> list[dict[str, object]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [json.loads(line) for line in f if line.strip()]


def load(datasets: list[str], data_dir: Path = DATA_DIR, limit: int | None = None) -> RoutingData:
    """Read the named data sets (keys of FILES) into one table. `limit` keeps the first rows
    of each file (for tests)."""
    prompts: list[str] = []
    ids: list[str] = []
    sources: list[str] = []
    models: dict[str, int] = {}
    rows, mods, dsets, targets = [], [], [], []
    files = []
    for d, name in enumerate(datasets):
        if name not in FILES:
            raise ValueError(f"unknown data set {name!r}; known: {sorted(FILES)}")
        path = data_dir / FILES[name]["file"]
        records = read_jsonl(path)[:limit]
        files.append(
            {
                "name": name,
                "file": path.name,
                "sha256": sha256_file(path),
                "rows": len(records),
                "license": FILES[name]["license"],
            }
        )
        for rec in records:
            r = len(prompts)
            prompts.append(str(rec["prompt"]))
            ids.append(str(rec["id"]))
            sources.append(str(rec["source"]))
            for m, y in rec["outcomes"].items():  # type: ignore[attr-defined]
                rows.append(r)
                mods.append(models.setdefault(m, len(models)))
                dsets.append(d)
                targets.append(float(y))
    return RoutingData(
        prompts=prompts,
        ids=ids,
        sources=sources,
        models=list(models),
        datasets=list(datasets),
        row=np.array(rows, np.int64),
        model=np.array(mods, np.int64),
        dataset=np.array(dsets, np.int64),
        target=np.array(targets, np.float32),
        files=files,
    )


def prompt_fold(prompt: str, k: int, salt: str = "") -> int:
    """Fold of a prompt, fixed by a hash of its normalized text: copies of one question
    (even with different whitespace or case) always land in the same fold. A `salt` gives a
    split independent of the unsalted one (folds inside a training split)."""
    norm = salt + " ".join(prompt.lower().split())
    return int.from_bytes(hashlib.sha256(norm.encode("utf-8")).digest()[:8], "big") % k


def folds(prompts: list[str], k: int, salt: str = "") -> npt.NDArray[np.int64]:
    return np.array([prompt_fold(p, k, salt) for p in prompts], np.int64)


def data_hash(files: list[dict[str, object]]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f['name']}:{f['sha256']}:{f['rows']};".encode())
    return h.hexdigest()
