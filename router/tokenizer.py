"""Texts -> token ids + attention mask (HF `tokenizers`), with the truncation policy.

Truncation policy: a text longer than `max_tokens` word pieces is cut, never
rejected. A plain prompt keeps its first `max_tokens` pieces (as
sentence-transformers does, so serving matches training). A chat transcript
keeps its last `max_tokens` pieces, because the newest turn is what the next
call answers. [CLS] and [SEP] are always kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from router.lexical import Tokens

Keep = Literal["head", "tail"]


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: npt.NDArray[np.int64]  # (B, T) padded with 0
    attention_mask: npt.NDArray[np.int64]  # (B, T)
    lengths: npt.NDArray[np.int64]  # (B,) real tokens per text, specials included
    full_lengths: npt.NDArray[np.int64]  # (B,) word pieces of the whole text before truncation, no specials


class RouterTokenizer:
    """Batch tokenizer for the encoder; one instance per truncation side."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (room for [CLS] and [SEP]), got {max_tokens}")
        self.max_tokens = max_tokens
        self._by_side: dict[Keep, Tokenizer] = {}
        for side, direction in (("head", "right"), ("tail", "left")):
            tok = Tokenizer.from_file(str(path))
            tok.no_padding()  # we pad per batch ourselves, to the batch's longest
            tok.enable_truncation(max_length=max_tokens, direction=direction)
            self._by_side[side] = tok  # type: ignore[index]
        self.vocab_size = self._by_side["head"].get_vocab_size()
        post = self._by_side["head"].post_processor
        self._specials = post.num_special_tokens_to_add(False) if post is not None else 0

    def encode(self, texts: Sequence[str], keep: Sequence[Keep] | None = None) -> Encoded:
        """Tokenize a batch; `keep[i]` says which end of text i survives truncation."""
        if keep is None:
            keep = ["head"] * len(texts)
        if len(keep) != len(texts):
            raise ValueError(f"keep has {len(keep)} entries for {len(texts)} texts")
        ids: list[list[int] | None] = [None] * len(texts)
        full = np.zeros(len(texts), np.int64)
        for side, tok in self._by_side.items():
            idx = [i for i, k in enumerate(keep) if k == side]
            if idx:
                for i, enc in zip(idx, tok.encode_batch([texts[i] for i in idx]), strict=True):
                    ids[i] = enc.ids
                    # what truncation cut off comes back as overflowing pieces (specials added to each)
                    full[i] = len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)
                    full[i] -= self._specials * (1 + len(enc.overflowing))
        lengths = np.fromiter((len(x) for x in ids if x is not None), np.int64, len(texts))
        width = int(lengths.max()) if len(texts) else 0
        input_ids = np.zeros((len(texts), width), np.int64)
        for row, seq in enumerate(ids):
            assert seq is not None, "every text was tokenized by one side. This is a bug."
            input_ids[row, : len(seq)] = seq
        attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return Encoded(input_ids, attention_mask, lengths, full)

    def tokens(self, texts: Sequence[str], keep: Sequence[Keep] | None = None) -> Tokens:
        """The texts' word pieces as the encoder sees them, for a head's lexical features."""
        enc = self.encode(texts, keep)
        return Tokens(enc.input_ids, enc.lengths, self.vocab_size)

    def count(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        """Token counts after truncation (for length buckets and logs)."""
        return self.encode(texts).lengths
