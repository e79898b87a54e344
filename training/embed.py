"""Embeds prompts through the serving encoder (same tokenizer, same ONNX graph) and caches the result."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from router.artifacts import make_session, sha256_file
from router.lexical import Tokens
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "embeddings"


def text_key(text: str) -> bytes:
    """A prompt's key in the embedding cache."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def cache_file(cache_dir: Path, encoder_sha256: str, max_tokens: int) -> Path:
    """The cache of one encoder (by its hash) at one truncation length. "-b1": embedded one
    prompt per run (see Embedder); files from before, embedded in batches, are not read."""
    return cache_dir / f"{encoder_sha256[:16]}-{max_tokens}-b1.npz"


def read_cache(path: Path) -> dict[bytes, npt.NDArray[np.float32]]:
    if not path.is_file():
        return {}
    with np.load(path) as z:
        return dict(zip((bytes(k) for k in z["keys"]), z["vectors"], strict=True))


def write_cache(path: Path, cache: dict[bytes, npt.NDArray[np.float32]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    keys = list(cache)
    np.savez(tmp, keys=np.array([np.frombuffer(k, np.uint8) for k in keys]), vectors=np.stack([cache[k] for k in keys]))
    os.replace(tmp, path)


class Embedder:
    """Embedding with the int8 ONNX encoder, one prompt per run, cached per (encoder hash, max_tokens).

    One prompt per run because the int8 encoder quantizes each run's activations with that run's
    own scale: a prompt embedded in a batch gets an embedding that depends a little on its
    batch-mates (cosine down to 0.997 on the shared data), so a cache filled in batches depends
    on which prompts were embedded together, and a fresh clone's `make train` fitted a different
    head from the shipped one. One at a time, every prompt's embedding is the one a quiet server
    computes for it, whatever else is embedded, and costs no more on 2 cores (3.3 s per 1,000
    MMLU prompts either way on the 2-layer encoder)."""

    def __init__(
        self,
        encoder_path: Path,
        tokenizer_path: Path,
        max_tokens: int,
        cache_dir: Path | None = CACHE_DIR,
    ) -> None:
        self.session = make_session(encoder_path, providers=["CPUExecutionProvider"], intra_op_threads=0)
        self.tokenizer = RouterTokenizer(tokenizer_path, max_tokens)
        self.encoder_sha256 = sha256_file(encoder_path)
        self.cache_path = cache_file(cache_dir, self.encoder_sha256, max_tokens) if cache_dir is not None else None

    def _forward(self, text: str) -> npt.NDArray[np.float32]:
        enc = self.tokenizer.encode([text])
        return self.session.run(["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0][0]

    def tokens(self, texts: list[str]) -> Tokens:
        """The texts' word pieces as the encoder (and a head's lexical features) see them."""
        return self.tokenizer.tokens(texts)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """(len(texts), dim) embeddings; texts already in the cache are not recomputed."""
        cache = read_cache(self.cache_path) if self.cache_path is not None else {}
        keys = [text_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in cache}
        if missing:
            t0 = time.perf_counter()
            for k, t in missing.items():
                cache[k] = self._forward(t)
            log.info("embedded %d new texts in %.1fs", len(missing), time.perf_counter() - t0)
            if self.cache_path is not None:
                write_cache(self.cache_path, cache)
        return np.stack([cache[k] for k in keys]).astype(np.float32)
