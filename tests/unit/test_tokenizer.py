import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from router import tokenizer as router_tokenizer
from router.tokenizer import WINDOW_CHARS_PER_TOKEN, RouterTokenizer


@pytest.fixture(scope="module")
def tok(model_dir):
    return RouterTokenizer(model_dir / "tokenizer.json", max_tokens=16)


def test_pads_to_longest_with_mask(tok):
    enc = tok.encode(["hello world", "a much longer sentence than the first one"])
    assert enc.input_ids.shape == enc.attention_mask.shape
    assert enc.input_ids.shape[1] == enc.lengths.max()
    assert enc.lengths[0] == 4  # [CLS] hello world [SEP]
    assert enc.attention_mask[0].tolist() == [1] * 4 + [0] * (enc.input_ids.shape[1] - 4)
    assert (enc.input_ids[0, 4:] == 0).all()
    assert enc.input_ids.dtype == np.int64 and enc.attention_mask.dtype == np.int64


def test_truncation_keeps_head_for_prompts_and_tail_for_chats(tok):
    words = " ".join(f"w{i}" for i in range(100))
    head, tail = tok.encode([words, words], ["head", "tail"]).input_ids
    assert len(head) == len(tail) == 16
    cls, sep = head[0], head[-1]
    assert tail[0] == cls and tail[-1] == sep  # specials survive either way
    first = tok.encode(["w0"]).input_ids[0][1:-1]
    last = tok.encode(["w99"]).input_ids[0][1:-1]
    assert head[1 : 1 + len(first)].tolist() == first.tolist()
    assert tail[-1 - len(last) : -1].tolist() == last.tolist()


def test_huge_text_is_cheap_and_bounded(tok):
    enc = tok.encode(["x " * 1_000_000])
    assert enc.lengths[0] == 16


def test_rejects_mismatched_keep(tok):
    with pytest.raises(ValueError, match="keep has 1 entries for 2 texts"):
        tok.encode(["a", "b"], ["head"])


# Text that tries the window's cut: words (some over WordPiece's 100 characters), numbers, every
# kind of split and non-split character the BERT normalizer treats specially.
TRICKY = [" ", "  ", "\n", "\t", "\r", "\v", "\f", "\u00a0", "\u3000", "\x00", "\x1f", "\ufffd",
          ".", ",", "'", "-", "...", "\u2026", "\u00ab", "\u00e9", "e\u0301", "\u0301", "\u4e2d\u6587",
          "\U0001f600", "\u200b", "##"]
word = st.one_of(st.text("abcdefghij", min_size=1, max_size=12), st.text("xyz", min_size=90, max_size=130),
                 st.integers(0, 10**6).map(str), st.sampled_from(TRICKY))
# Short words between characters that split them and characters the normalizer deletes (joining
# them), in runs, so the window's cut lands on each kind, also where the window has barely enough pieces.
joined = st.lists(st.tuples(st.text("ab", min_size=1, max_size=3), st.sampled_from(
    [" ", "\n", ".", "\u00a0", "\v", "\f", "\x1f", "\x00", "\u0301", "\u200b"]), st.integers(1, 30)), max_size=150)
long_text = st.one_of(st.lists(word, max_size=300).map("".join),
                      joined.map(lambda ws: "".join(w + sep * n for w, sep, n in ws)))


@pytest.fixture(scope="module")
def reference(model_dir):
    """The tokenizer itself, on the whole text: what the window must reproduce."""
    made: dict[tuple[int, str], Tokenizer] = {}

    def encode(text: str, max_tokens: int, keep: str) -> list[int]:
        if (max_tokens, keep) not in made:
            tok = made[max_tokens, keep] = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            tok.no_padding()
            tok.enable_truncation(max_length=max_tokens, direction="right" if keep == "head" else "left")
        return made[max_tokens, keep].encode(text).ids
    return encode


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(long_text, min_size=1, max_size=4), keep=st.sampled_from(["head", "tail"]))
def test_the_window_keeps_the_pieces_the_whole_text_keeps(tok, reference, texts, keep):
    enc = tok.encode(texts, [keep] * len(texts))
    for row, text in enumerate(texts):
        want = reference(text, tok.max_tokens, keep)
        assert enc.input_ids[row, : enc.lengths[row]].tolist() == want, text
        if len(text) <= WINDOW_CHARS_PER_TOKEN * tok.max_tokens:  # no window: counted exactly
            assert enc.full_lengths[row] == len(reference(text, 10**9, keep)) - 2


def test_a_long_text_is_tokenized_from_its_window_only(tok, monkeypatch):
    """The kept end alone reaches the tokenizer (a 4 MB prompt held the server for seconds),
    and the whole text's count is extrapolated from it."""
    seen = []
    real = router_tokenizer.window
    monkeypatch.setattr(router_tokenizer, "window", lambda *a: seen.append(real(*a)) or seen[-1])
    text = "the quick brown fox jumps over the lazy dog. " * 100_000
    enc = tok.encode([text, text], ["head", "tail"])
    assert max(len(part) for part in seen) <= WINDOW_CHARS_PER_TOKEN * tok.max_tokens
    exact = 10 * 100_000  # 9 words and a full stop per sentence, one piece each (checked below)
    assert tok.encode(["the quick brown fox jumps over the lazy dog. " * 2], ["head"]).full_lengths[0] == 20
    assert np.abs(enc.full_lengths / exact - 1).max() < 0.05  # from a window of 128 characters


def test_a_window_without_enough_pieces_grows_to_the_whole_text(tok, reference):
    spaces = " " * (WINDOW_CHARS_PER_TOKEN * tok.max_tokens * 10)
    words = "a b c d e f g h i j k l m n o p"
    for text, keep in ((spaces + words, "head"), (words + spaces, "tail")):
        enc = tok.encode([text], [keep])
        assert enc.input_ids[0, : enc.lengths[0]].tolist() == reference(text, tok.max_tokens, keep)
        assert enc.full_lengths[0] == 16


@pytest.mark.parametrize("joiner", ["\v", "\f", "\x1f", "\x00", "\u200b", "\u0301", "\ufffd", "\x7f"])
def test_the_window_is_never_cut_where_the_normalizer_joins_a_word(tok, reference, joiner):
    """The normalizer deletes `joiner`, so "xy<joiner>zw" is one word. Placed where a cut there would
    leave just enough pieces in the window, the kept pieces must still be those of the whole text."""
    assert tok.encode([f"xy{joiner}zw"]).lengths[0] < tok.encode(["xy zw"]).lengths[0] + 1  # one word
    chars, needed = WINDOW_CHARS_PER_TOKEN * tok.max_tokens, tok.max_tokens - 2
    head = "a " * (needed - 1)
    head += " " * (chars - len(head) - 3) + "xy" + joiner + "zw" + " b" * 50  # the window's last character
    tail = "b " * 50 + "zw" + joiner + "xy" + " " * (chars - 3 - 2 * (needed - 1)) + " a" * (needed - 1)
    assert head[chars - 1] == joiner and tail[-chars] == joiner
    for text, keep in ((head, "head"), (tail, "tail")):
        enc = tok.encode([text], [keep])
        assert enc.input_ids[0, : enc.lengths[0]].tolist() == reference(text, tok.max_tokens, keep), (joiner, keep)


def test_another_kind_of_tokenizer_is_given_the_whole_text(model_dir, tmp_path, monkeypatch):
    """The window relies on BERT's normalizer and pre-tokenizer; any other tokenizer reads it all."""
    import json

    spec = json.loads((model_dir / "tokenizer.json").read_text("utf-8"))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), "utf-8")
    other = RouterTokenizer(tmp_path / "tokenizer.json", max_tokens=16)
    seen = []
    real = router_tokenizer.window
    monkeypatch.setattr(router_tokenizer, "window", lambda *a: seen.append(real(*a)) or seen[-1])
    text = "the quick brown fox jumps over the lazy dog. " * 100
    enc = other.encode([text, text], ["head", "tail"])
    assert seen == [text, text] and (enc.lengths == 16).all()
