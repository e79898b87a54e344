import numpy as np
import pytest

from router.tokenizer import RouterTokenizer


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
