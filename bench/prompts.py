"""Real prompts from shared/data, grouped in length buckets by the model's own token count."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from router.tokenizer import RouterTokenizer

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_FILES = ("mmlu.jsonl.gz", "alpaca_eval.jsonl.gz")
# (name, fewest tokens, most tokens); counts include [CLS] and [SEP], as the encoder sees them.
BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("<=16", 1, 16), ("17-64", 17, 64), ("65-128", 65, 128), ("129-256", 129, 256),
)
NO_TRUNCATION = 1 << 20  # count a prompt's full length, so longer ones fall outside every bucket


@dataclass(frozen=True)
class Bucket:
    name: str
    prompts: list[str]
    tokens: list[int]  # per prompt, same order
    available: int  # prompts in the data that fall in the bucket (before sampling)


def read_prompts(data_dir: Path, files: Sequence[str] = DATA_FILES) -> list[str]:
    prompts: list[str] = []
    for name in files:
        with gzip.open(data_dir / name, "rt", encoding="utf-8") as f:
            prompts.extend(json.loads(line)["prompt"] for line in f if line.strip())
    return prompts


def bucket_prompts(
    prompts: Sequence[str], tokenizer_path: Path, *, per_bucket: int, seed: int = 0
) -> list[Bucket]:
    """Up to `per_bucket` distinct prompts per bucket, a seeded sample so runs compare."""
    counts = RouterTokenizer(tokenizer_path, NO_TRUNCATION).count(prompts)
    rng = random.Random(seed)
    buckets = []
    for name, lo, hi in BUCKETS:
        members = [i for i, n in enumerate(counts) if lo <= n <= hi]
        chosen = rng.sample(members, min(per_bucket, len(members)))
        buckets.append(Bucket(name, [prompts[i] for i in chosen],
                              [int(counts[i]) for i in chosen], len(members)))
    return buckets
