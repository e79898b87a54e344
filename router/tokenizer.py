"""Texts -> token ids + attention mask (HF `tokenizers`), with the truncation policy.

Truncation policy: a text longer than `max_tokens` word pieces is cut, never
rejected. A plain prompt keeps its first `max_tokens` pieces (as
sentence-transformers does, so serving matches training). A chat transcript
keeps its last `max_tokens` pieces, because the newest turn is what the next
call answers. [CLS] and [SEP] are always kept.

Only the end that is kept is tokenized (for BERT's tokenizer, which all shipped encoders use). A
text longer than `WINDOW_CHARS_PER_TOKEN` characters per kept piece is cut at a space, tab,
newline or ASCII punctuation character near that length (where that tokenizer always splits
words, so every piece before the cut, or after it for the tail, is the same as in the whole text),
and only that window is tokenized; if it holds too few pieces, the window grows until it does, or
is the whole text. Tokenizing costs about 0.3-0.7 us per character, so without the window a 4 MB
prompt held the server for 2-3 s. The pieces kept are the same either way; the count of the whole
text's pieces (`full_lengths`, the cost estimate's input tokens) is then extrapolated from the
window's pieces per character.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from router.lexical import Tokens

Keep = Literal["head", "tail"]

WINDOW_CHARS_PER_TOKEN = 8  # the window's first size, per piece kept; English averages 4-5 per piece
WINDOW_GROWTH = 4
# Where the BERT tokenizer always splits words: space, tab, newline, carriage return, and ASCII
# punctuation (a piece of its own). Not \v or \f: its normalizer deletes them, joining their neighbours.
_SPLIT = re.compile(r"[ \t\n\r!-/:-@\[-`{-~]")


def window(text: str, chars: int, keep: Keep) -> str:
    """`text` cut at a split point within its first (head) or last (tail) `chars` characters;
    the whole text when it is no longer than `chars` or the window has no split point."""
    if len(text) <= chars:
        return text
    if keep == "head":
        m = _SPLIT.search(text[chars - 1 :: -1])  # the last split point in text[:chars]
        return text if m is None else text[: chars - 1 - m.start()]
    m = _SPLIT.search(text, len(text) - chars)  # the first split point in text[-chars:]
    return text if m is None else text[m.start() :]


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: npt.NDArray[np.int64]  # (B, T) padded with 0
    attention_mask: npt.NDArray[np.int64]  # (B, T)
    lengths: npt.NDArray[np.int64]  # (B,) real tokens per text, specials included
    full_lengths: npt.NDArray[np.int64]  # (B,) word pieces of the whole text, no specials (extrapolated past a window)


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
        head = self._by_side["head"]
        # The window's cut is exact only where BERT's normalizer and pre-tokenizer decide the words.
        self._window = isinstance(head.normalizer, normalizers.BertNormalizer) and isinstance(
            head.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
        self.vocab_size = head.get_vocab_size()
        post = head.post_processor
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
            todo = [i for i, k in enumerate(keep) if k == side]
            # without the window, every text fits in the first "window"
            chars = WINDOW_CHARS_PER_TOKEN * self.max_tokens if self._window else max(map(len, texts), default=0)
            while todo:
                parts = [window(texts[i], chars, side) for i in todo]
                retry = []
                for i, part, enc in zip(todo, parts, tok.encode_batch(parts), strict=True):
                    # what truncation cut off comes back as overflowing pieces (specials added to each)
                    pieces = len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)
                    pieces -= self._specials * (1 + len(enc.overflowing))
                    whole = len(part) == len(texts[i])
                    if not whole and pieces < self.max_tokens - self._specials:
                        retry.append(i)  # too few pieces in the window to fill the kept ones
                        continue
                    ids[i] = enc.ids
                    full[i] = pieces if whole else max(pieces, round(pieces * len(texts[i]) / len(part)))
                todo, chars = retry, chars * WINDOW_GROWTH
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
