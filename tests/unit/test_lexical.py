"""router.lexical: the head's word-piece features, against scikit-learn's definition of them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.lexical import Lexicon, Tokens, feature_keys, lexical_logits
from router.tokenizer import RouterTokenizer
from tests.conftest import MODELS

TOKENIZER = MODELS / "encoder" / "all-MiniLM-L6-v2-first2-int8" / "tokenizer.json"
TEXTS = [
    "Which of the following is a prime number?",
    "Which of the following is not a mammal?",
    "Write a haiku about the sea.",
    "Write a limerick about a cat.",
    "Prove that the square root of 2 is irrational.",
    "Which of the following is a prime number? A) 4 B) 6 C) 7",
    "",
]


def _tokens(texts: list[str], max_tokens: int = 64) -> Tokens:
    tok = RouterTokenizer(TOKENIZER, max_tokens)
    enc = tok.encode(texts)
    return Tokens(enc.input_ids, enc.lengths, tok.vocab_size)


def _dense(lexicon: Lexicon, index: np.ndarray, value: np.ndarray) -> np.ndarray:
    out = np.zeros((len(index), lexicon.size + 1))
    np.add.at(out, (np.arange(len(index))[:, None].repeat(index.shape[1], 1), index), value)
    return out[:, :-1]


def test_features_are_scikit_learns_binary_tfidf_over_word_pieces():
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    tokens = _tokens(TEXTS)
    lexicon = Lexicon.fit(tokens.input_ids, tokens.lengths, tokens.vocab, min_df=2)
    # the same word pieces as text, [CLS] and [SEP] left out
    docs = [" ".join(str(i) for i in ids[1 : n - 1]) for ids, n in zip(tokens.input_ids, tokens.lengths, strict=True)]
    ref = sklearn_text.TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), binary=True, min_df=2)
    want = ref.fit_transform(docs).toarray()
    got = _dense(lexicon, *lexicon.features(tokens.input_ids, tokens.lengths))
    # match features by key: sklearn names a pair "a b", router.lexical keys it vocab + a * vocab + b
    names = ref.get_feature_names_out()
    keys = [
        int(n) if " " not in n else tokens.vocab + int(n.split()[0]) * tokens.vocab + int(n.split()[1]) for n in names
    ]
    order = np.searchsorted(lexicon.keys, keys)
    assert lexicon.size == len(names) and (lexicon.keys[order] == keys).all()
    np.testing.assert_allclose(got[:, order], want, atol=1e-6)
    np.testing.assert_allclose(lexicon.idf[order], ref.idf_, rtol=1e-6)


def test_a_prompt_without_known_features_gets_none_and_empty_texts_are_fine():
    tokens = _tokens(TEXTS)
    lexicon = Lexicon.fit(tokens.input_ids, tokens.lengths, tokens.vocab, min_df=2)
    new = _tokens(["zebra xylophone quartz", ""])
    index, value = lexicon.features(new.input_ids, new.lengths)
    assert (index == lexicon.size).all() and (value == 0).all()
    weight = np.ones((lexicon.size, 3), np.float32)
    assert (lexical_logits(weight, index, value) == 0).all()


def test_each_feature_counts_once_and_rows_have_unit_norm():
    tokens = _tokens(["the cat the cat the cat", "the cat sat"])
    lexicon = Lexicon.fit(tokens.input_ids, tokens.lengths, tokens.vocab, min_df=1)
    index, value = lexicon.features(tokens.input_ids, tokens.lengths)
    for row_index, row_value in zip(index, value, strict=True):
        real = row_index[row_index < lexicon.size]
        assert len(real) == len(set(real.tolist()))
        assert np.sqrt(np.square(row_value).sum()) == pytest.approx(1.0, abs=1e-6)
    # "the", "cat", "the cat", "cat the" in the first prompt; "the", "cat", "sat", "the cat", "cat sat" in the second
    assert [int((r < lexicon.size).sum()) for r in index] == [4, 5]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=12), min_size=1, max_size=6))
def test_keys_never_collide_and_padding_never_counts(rows):
    vocab = 41
    width = max(len(r) for r in rows) + 2
    ids = np.zeros((len(rows), width + 3), np.int64)  # extra padding columns
    for i, r in enumerate(rows):
        ids[i, : len(r) + 2] = [101 % vocab, *r, 102 % vocab]
    lengths = np.array([len(r) + 2 for r in rows], np.int64)
    keys = feature_keys(ids, lengths, vocab)
    for i, r in enumerate(rows):
        want = set(r) | {vocab + a * vocab + b for a, b in zip(r, r[1:], strict=False)}
        assert set(keys[i][keys[i] >= 0].tolist()) == want


def test_save_and_load_round_trip(tmp_path):
    tokens = _tokens(TEXTS)
    lexicon = Lexicon.fit(tokens.input_ids, tokens.lengths, tokens.vocab, min_df=2)
    lexicon.save(tmp_path / "lexicon.npz")
    again = Lexicon.load(tmp_path / "lexicon.npz")
    assert (again.keys == lexicon.keys).all() and (again.idf == lexicon.idf).all()
    assert (again.vocab, again.min_df, again.n_docs) == (lexicon.vocab, 2, len(TEXTS))
    bad = Lexicon(lexicon.keys[::-1].copy(), lexicon.idf, lexicon.vocab, 2, 7)
    bad.save(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="sorted"):
        Lexicon.load(tmp_path / "bad.npz")
