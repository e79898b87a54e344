"""Lexical features: which word pieces, and which adjacent pairs of them, a prompt contains.

The head reads them beside the embedding (training.model, `lexical_l2`). They are the
encoder's own word-piece ids, so serving tokenizes once. A prompt's features are binary
tf-idf, L2-normalized: scikit-learn's `TfidfVectorizer(binary=True, ngram_range=(1, 2))`
over the word pieces ([CLS], [SEP] and padding left out). The vocabulary and idf are fitted
on the training prompts only (features seen in at least `min_df` of them).

A feature's key is the piece id `a` for a single piece and `vocab + a * vocab + b` for the
pair (a, b), so keys never collide. Every step is vectorized over the batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Tokens:
    """Prompts as the encoder sees them (router.tokenizer.Encoded's ids and lengths)."""

    input_ids: I64  # (N, T)
    lengths: I64  # (N,) specials included
    vocab: int  # the tokenizer's vocabulary size

    def take(self, rows: npt.NDArray[np.int64]) -> Tokens:
        return Tokens(self.input_ids[rows], self.lengths[rows], self.vocab)

    def append(self, other: Tokens) -> Tokens:
        """These rows, then `other`'s (padded to the wider of the two)."""
        width = max(self.input_ids.shape[1], other.input_ids.shape[1])
        ids = np.zeros((len(self.lengths) + len(other.lengths), width), np.int64)
        ids[: len(self.lengths), : self.input_ids.shape[1]] = self.input_ids
        ids[len(self.lengths) :, : other.input_ids.shape[1]] = other.input_ids
        return Tokens(ids, np.concatenate([self.lengths, other.lengths]), self.vocab)


def lexical_logits(weight: F32, index: I64, value: F32) -> F32:
    """(B, outputs): each row's features times their weights; `weight` is (F, outputs) and the
    padding index F reads zeros (what head.onnx computes with a zero row appended)."""
    padded = np.vstack([weight, np.zeros((1, weight.shape[1]), weight.dtype)])
    return np.einsum("bk,bko->bo", value, padded[index]).astype(np.float32)


def feature_keys(input_ids: I64, lengths: I64, vocab: int) -> I64:
    """(B, 2T - 1) keys of every piece and adjacent pair in each row; -1 where there is none.

    Rows are [CLS] pieces... [SEP] then padding, as router.tokenizer encodes them."""
    ids = np.asarray(input_ids, np.int64)
    pos = np.arange(ids.shape[1])
    inner = (pos[None, :] >= 1) & (pos[None, :] < (np.asarray(lengths, np.int64) - 1)[:, None])
    single = np.where(inner, ids, -1)
    pair = np.where(inner[:, :-1] & inner[:, 1:], vocab + ids[:, :-1] * vocab + ids[:, 1:], -1)
    return np.concatenate([single, pair], axis=1)


@dataclass(frozen=True)
class Lexicon:
    keys: I64  # (F,) sorted feature keys
    idf: F32  # (F,) smoothed idf of each key: ln((1 + n) / (1 + df)) + 1
    vocab: int  # the tokenizer's vocabulary size (the key space)
    min_df: int
    n_docs: int  # prompts it was fitted on

    @property
    def size(self) -> int:
        return len(self.keys)

    @functools.cached_property
    def _idf_padded(self) -> F32:
        """idf with a 0 at the padding index F (made once: it is the size of the lexicon)."""
        return np.append(self.idf, np.float32(0.0))

    @classmethod
    def fit(cls, input_ids: I64, lengths: I64, vocab: int, min_df: int = 2) -> Lexicon:
        if min_df < 1:
            raise ValueError(f"min_df must be >= 1, got {min_df}")
        keys = feature_keys(input_ids, lengths, vocab)
        rows = np.broadcast_to(np.arange(len(keys))[:, None], keys.shape)
        present = keys >= 0
        # a document counts a key once: unique (row, key) pairs, then count rows per key
        pairs = np.unique(np.stack([keys[present], rows[present]]), axis=1)
        uniq, df = np.unique(pairs[0], return_counts=True)
        keep = df >= min_df
        n = len(keys)
        idf = (np.log((1.0 + n) / (1.0 + df[keep])) + 1.0).astype(np.float32)
        return cls(uniq[keep].astype(np.int64), idf, int(vocab), int(min_df), int(n))

    def features(self, input_ids: I64, lengths: I64) -> tuple[I64, F32]:
        """(index, value), both (B, K): feature indices into 0..F-1 and their weights; the
        padding index is F (value 0). Each row's values have unit L2 norm (or are all 0)."""
        F = self.size
        keys = feature_keys(input_ids, lengths, self.vocab)
        if F == 0 or keys.shape[1] == 0:
            return np.full((len(keys), 1), F, np.int64), np.zeros((len(keys), 1), np.float32)
        at = np.minimum(np.searchsorted(self.keys, keys), F - 1)
        index = np.where((self.keys[at] == keys) & (keys >= 0), at, F)
        index.sort(axis=1)
        index[:, 1:][index[:, 1:] == index[:, :-1]] = F  # binary: each feature once per prompt
        index.sort(axis=1)
        width = max(int((index < F).sum(axis=1).max()), 1)
        index = np.ascontiguousarray(index[:, :width])
        value = self._idf_padded[index]
        norm = np.sqrt(np.square(value).sum(axis=1, keepdims=True))
        value = np.divide(value, norm, out=np.zeros_like(value), where=norm > 0)
        return index, value.astype(np.float32)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(
                f,
                keys=self.keys,
                idf=self.idf,
                meta=np.array([self.vocab, self.min_df, self.n_docs], np.int64),
            )

    @classmethod
    def load(cls, path: Path) -> Lexicon:
        with np.load(path) as z:
            vocab, min_df, n_docs = (int(v) for v in z["meta"])
            keys, idf = z["keys"].astype(np.int64), z["idf"].astype(np.float32)
        if len(keys) != len(idf) or (len(keys) > 1 and not (np.diff(keys) > 0).all()):
            raise ValueError(f"{path}: keys must be sorted, unique and match idf in length")
        return cls(keys, idf, vocab, min_df, n_docs)
