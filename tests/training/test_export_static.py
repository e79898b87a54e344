"""The static (model2vec) encoder as ONNX: the graph is a masked, normalized mean; the served
tokenizer and graph embed what model2vec's own encode does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.artifacts import make_session
from router.tokenizer import RouterTokenizer
from tests.conftest import MODELS, require_data
from training.export import (
    _parser,
    export_static_encoder,
    quantize_rows,
    static_encoder_graph,
    static_table,
    static_tokenizer,
)

MINILM_TOKENIZER = MODELS / "encoder" / "all-MiniLM-L6-v2-int8" / "tokenizer.json"
TEXTS = [
    "What is 2 + 2?",
    "Prove that there are infinitely many primes, then explain the proof to a child.",
    "\u2603\u2603",  # only [UNK]: the embedding is all zeros, not NaN
    "naïve café [CLS] tokens",
    "x",
]


def m2v_style_tokenizer():  # type: ignore[no-untyped-def]
    """MiniLM's tokenizer as model2vec keeps it: no [CLS]/[SEP] template, no padding or truncation,
    and only [PAD] and [UNK] as added tokens (so a literal "[CLS]" in a prompt is plain text)."""
    from tokenizers import Tokenizer

    spec = json.loads(MINILM_TOKENIZER.read_text("utf-8"))
    spec["post_processor"], spec["truncation"], spec["padding"] = None, None, None
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in ("[PAD]", "[UNK]")]
    return Tokenizer.from_str(json.dumps(spec))


def run_graph(table: np.ndarray, tokenizer_path, texts, max_tokens=512):  # type: ignore[no-untyped-def]
    sess = make_session(static_encoder_graph(table).SerializeToString(), providers=["CPUExecutionProvider"],
                        intra_op_threads=1)
    enc = RouterTokenizer(tokenizer_path, max_tokens).encode(texts)
    return sess.run(["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0], enc


def run_graph_int8(table: np.ndarray, tokenizer_path, texts, max_tokens=512):  # type: ignore[no-untyped-def]
    q, scales = quantize_rows(table)
    sess = make_session(static_encoder_graph(q, scales=scales).SerializeToString(),
                        providers=["CPUExecutionProvider"], intra_op_threads=1)
    enc = RouterTokenizer(tokenizer_path, max_tokens).encode(texts)
    return sess.run(["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0], enc


def test_quantize_rows_round_trip():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(50, 24)).astype(np.float32) * rng.uniform(0.01, 10, size=(50, 1))
    table[7] = 0.0
    q, scales = quantize_rows(table)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (50,)
    assert np.abs(q).max() == 127 and (q[7] == 0).all() and scales[7] == 0.0
    err = np.abs(scales[:, None] * q - table)
    assert (err <= scales[:, None] / 2 + 1e-6).all()  # off by at most half a step per value


def test_graph_refuses_mismatched_scales():
    q, scales = quantize_rows(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="row scales"):
        static_encoder_graph(q)
    with pytest.raises(ValueError, match="row scales"):
        static_encoder_graph(np.ones((4, 3), np.float16), scales=scales)
    with pytest.raises(ValueError, match="scales must be"):
        static_encoder_graph(q, scales=scales[:3])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8])
def test_graph_is_the_normalized_masked_mean(tmp_path, dtype):
    tokenizer, zero_ids = static_tokenizer(m2v_style_tokenizer())
    tok_path = tmp_path / "tokenizer.json"
    tokenizer.save(str(tok_path))
    vocab = tokenizer.get_vocab()
    assert zero_ids == [vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]]
    rng = np.random.default_rng(0)
    table = static_table(rng.normal(size=(tokenizer.get_vocab_size(), 8)), tokenizer.get_vocab_size(), zero_ids)
    if dtype == np.int8:  # the served vectors are the dequantized rows
        got, enc = run_graph_int8(table, tok_path, TEXTS)
        q, scales = quantize_rows(table)
        table = scales[:, None] * q.astype(np.float32)
    else:
        table = table.astype(dtype)
        got, enc = run_graph(table, tok_path, TEXTS)

    assert got.shape == (len(TEXTS), 8) and got.dtype == np.float32
    assert (enc.attention_mask == 0).any(), "the batch must be padded for this test to mean anything"
    for row, text in enumerate(TEXTS):
        ids = np.array(enc.input_ids[row, : enc.lengths[row]])
        assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]  # counted like MiniLM's tokens
        kept = ids[~np.isin(ids, zero_ids)]
        if len(kept) == 0:
            np.testing.assert_array_equal(got[row], 0.0)
            continue
        mean = table[kept].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(got[row], mean / np.linalg.norm(mean), atol=1e-6, err_msg=text)


def test_token_counts_match_minilm(tmp_path):
    tokenizer, _ = static_tokenizer(m2v_style_tokenizer())
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    # a literal "[CLS]" is one token to MiniLM and plain text to model2vec; nothing else differs
    texts = [t for t in TEXTS if "[CLS]" not in t]
    static = RouterTokenizer(tmp_path / "tokenizer.json", 16).count(texts)
    minilm = RouterTokenizer(MINILM_TOKENIZER, 16).count(texts)
    np.testing.assert_array_equal(static, minilm)


def test_cli_routes_static_and_layers():
    args = _parser().parse_args(["static", "--out", "x", "--pca-dims", "none"])
    assert args.pca_dims is None and args.max_tokens == 512 and args.table_dtype == "int8"
    assert _parser().parse_args(["static", "--out", "x", "--table-dtype", "float16"]).table_dtype == "float16"
    assert _parser().parse_args(["static", "--out", "x", "--pca-dims", "auto"]).pca_dims == "auto"
    assert _parser().parse_args(["encoder", "--out", "x", "--layers", "3"]).layers == 3


@pytest.mark.parametrize(("table_dtype", "atol"), [("float16", 2e-3), ("int8", 1.5e-2)])
def test_export_matches_model2vec_encode(tmp_path, table_dtype, atol):
    """A small StaticModel built in place (no distillation): the exported files embed what
    StaticModel.encode does, and encoder.json describes them."""
    pytest.importorskip("model2vec")
    from model2vec import StaticModel

    m2v_tok = m2v_style_tokenizer()
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(m2v_tok.get_vocab_size(), 16)).astype(np.float16)
    model = StaticModel(vectors=vectors, tokenizer=m2v_tok, normalize=True, config={"apply_pca": 16})

    record = export_static_encoder(tmp_path, static_model=model, data_dir=require_data(), max_tokens=64,
                                   table_dtype=table_dtype)

    assert record["parity"]["onnx"]["mean"] >= 0.999 and record["parity"]["onnx"]["n"] == 500
    assert record["dim"] == 16 and record["max_tokens"] == 64 and record["name"].endswith("pca16")
    assert record["distillation"]["table_dtype"] == table_dtype
    assert json.loads((tmp_path / "encoder.json").read_text()) == record
    sess = make_session(tmp_path / "encoder.onnx", providers=["CPUExecutionProvider"], intra_op_threads=1)
    enc = RouterTokenizer(tmp_path / "tokenizer.json", 64).encode(TEXTS)
    got = sess.run(["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0]
    want = model.encode(TEXTS, max_length=62).astype(np.float32)
    np.testing.assert_allclose(got, want, atol=atol)
