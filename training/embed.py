"""Embeds prompts through the serving encoder (same tokenizer, same ONNX graph) and caches the result."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from router.artifacts import make_session, sha256_file
from router.lexical import Tokens
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "embeddings"


def _text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class Embedder:
    """Batch embedding with the int8 ONNX encoder, cached per (encoder hash, max_tokens)."""

    def __init__(
        self,
        encoder_path: Path,
        tokenizer_path: Path,
        max_tokens: int,
        cache_dir: Path | None = CACHE_DIR,
        batch_size: int = 64,
    ) -> None:
        self.session = make_session(encoder_path, providers=["CPUExecutionProvider"], intra_op_threads=0)
        self.tokenizer = RouterTokenizer(tokenizer_path, max_tokens)
        self.batch_size = batch_size
        self.encoder_sha256 = sha256_file(encoder_path)
        self.cache_path = cache_dir / f"{self.encoder_sha256[:16]}-{max_tokens}.npz" if cache_dir is not None else None

    def _forward(self, texts: list[str]) -> npt.NDArray[np.float32]:
        enc = self.tokenizer.encode(texts)
        return self.session.run(["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0]

    def tokens(self, texts: list[str]) -> Tokens:
        """The texts' word pieces as the encoder (and a head's lexical features) see them."""
        return self.tokenizer.tokens(texts)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """(len(texts), dim) embeddings; texts already in the cache are not recomputed."""
        cache: dict[bytes, npt.NDArray[np.float32]] = {}
        if self.cache_path is not None and self.cache_path.exists():
            with np.load(self.cache_path) as z:
                cache = dict(zip((bytes(k) for k in z["keys"]), z["vectors"], strict=True))
        keys = [_text_key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            by_key = {k: t for k, t in zip(keys, texts, strict=True)}
            todo = sorted(missing, key=lambda k: len(by_key[k]))  # similar lengths pad little
            t0 = time.perf_counter()
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for k, v in zip(chunk, self._forward([by_key[k] for k in chunk]), strict=True):
                    cache[k] = v
            log.info("embedded %d new texts in %.1fs", len(todo), time.perf_counter() - t0)
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                all_keys = list(cache)
                tmp = self.cache_path.with_suffix(".tmp.npz")
                np.savez(
                    tmp,
                    keys=np.array([np.frombuffer(k, np.uint8) for k in all_keys]),
                    vectors=np.stack([cache[k] for k in all_keys]),
                )
                tmp.replace(self.cache_path)
        return np.stack([cache[k] for k in keys]).astype(np.float32)
