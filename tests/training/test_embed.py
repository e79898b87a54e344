"""Training embeddings: one prompt per encoder run, so a prompt's embedding never depends on what
else was embedded with it (the int8 encoder quantizes each run with its own scale)."""

from __future__ import annotations

import numpy as np

from router.artifacts import load_model
from router.engine import RoutingEngine
from training import calibrate as C
from training.embed import Embedder, cache_file, read_cache, text_key

PROMPTS = [
    "What is the capital of Australia?",
    "Prove that there are infinitely many primes, then generalize the argument to primes of the form 4k+3. " * 3,
    "Write a haiku about autumn.",
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6",
    "x",
]


def test_an_embedding_does_not_depend_on_the_others_or_on_the_cache(model_dir, tmp_path):
    encoder = model_dir / "encoder.onnx", model_dir / "tokenizer.json"
    meta = load_model(model_dir, device="cpu", intra_op_threads=1).main_stage.encoder_spec
    together = Embedder(*encoder, meta.max_tokens, cache_dir=tmp_path / "a").embed(PROMPTS)
    warm = Embedder(*encoder, meta.max_tokens, cache_dir=tmp_path / "b")
    warm.embed(PROMPTS[::2])  # the cache filled in another order, with other company
    mixed = warm.embed(PROMPTS)
    alone = np.stack([Embedder(*encoder, meta.max_tokens, cache_dir=None).embed([p])[0] for p in PROMPTS])
    assert np.array_equal(together, alone) and np.array_equal(mixed, alone)
    # in a batch the int8 encoder's scale is the batch's: what the old batched cache held differs
    enc = warm.tokenizer.encode(PROMPTS)
    batched = warm.session.run(["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0]
    assert not np.array_equal(batched, alone)


def test_calibrate_embeds_as_training_does_and_shares_its_cache(model_dir, tmp_path):
    """The same vectors through the serving engine (calibrate) and the training embedder, one cache file."""
    engine = RoutingEngine(load_model(model_dir, device="cpu", intra_op_threads=1))
    spec = engine.main.encoder_spec
    prompts = C.Prompts(PROMPTS, ["head"] * len(PROMPTS), [C.RequestContext()] * len(PROMPTS), ["t"] * len(PROMPTS))
    served, _ = C.embed(engine, prompts, cache_dir=tmp_path)
    trained = Embedder(model_dir / "encoder.onnx", model_dir / "tokenizer.json", spec.max_tokens, cache_dir=None)
    np.testing.assert_allclose(served, trained.embed(PROMPTS), atol=1e-6)
    cached = read_cache(cache_file(tmp_path, spec.sha256, spec.max_tokens))
    assert set(cached) == {text_key(p) for p in PROMPTS}
