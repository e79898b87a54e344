"""Training at small size: fit -> export -> a version the server loads; encoder parity. Needs the train extra."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from router.artifacts import load_model  # noqa: E402
from router.engine import RouteQuery, RoutingEngine  # noqa: E402
from router.profiles import Profile, Tier  # noqa: E402
from router.scoring import length_features  # noqa: E402
from tests.conftest import MODELS, require_data  # noqa: E402
from training.export import export_head  # noqa: E402
from training.fit import FitConfig, fit  # noqa: E402
from training.model import WinRateHead  # noqa: E402


def test_small_fit_writes_a_servable_self_describing_version(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = FitConfig(
        data_dir=str(require_data()),
        models_dir=str(tmp_path),
        limit=60,
        steps=30,
        encoder_dir=str(MODELS / "encoder" / "all-MiniLM-L6-v2-int8"),
    )
    out = fit(cfg)
    version_dir = tmp_path / (tmp_path / "DEFAULT").read_text().strip()
    assert out["out_dir"] == str(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["head"]["models"][:2] == ["mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"]
    assert manifest["head"]["parity_max_abs_diff"] < 1e-4
    assert manifest["training"]["config"]["limit"] == 60
    assert {f["name"] for f in manifest["training"]["data"]} == {"mmlu", "alpaca_eval", "alpaca_eval_binary"}
    assert "log_loss_prompt_length" in manifest["metrics"]["mmlu"]
    model = load_model(version_dir, device="cpu")
    profile = Profile(
        name="p",
        floor=0.5,
        tiers=(Tier(name="weak", model="mixtral-8x7b-instruct-v0.1"), Tier(name="strong", model="gpt-4-1106-preview")),
    )
    (r,) = RoutingEngine(model).route_batch([RouteQuery("What is 2 + 2?", profile)])
    assert r.model_version == manifest["version"] and len(r.quality) == 2
    # 60 rows give no pair 300 shared outcomes: every pair falls back to the pooled temperature
    assert manifest["head"]["win_pairs"] == [] and manifest["metrics"]["win_probability"]["fitted_pairs"] == 0
    # a fitted pair (stored strong-first here) is what the engine serves for that pair
    import dataclasses

    from router.artifacts import WinPair
    from router.scoring import sigmoid

    pair = WinPair(first="gpt-4-1106-preview", second="mixtral-8x7b-instruct-v0.1", scale=0.5, bias=0.2, n=500)
    head_spec = model.manifest.head.model_copy(update={"win_pairs": [pair]})
    paired = dataclasses.replace(model, manifest=model.manifest.model_copy(update={"head": head_spec}))
    engine = RoutingEngine(paired)
    (r2,) = engine.route_batch([RouteQuery("What is 2 + 2?", profile)])
    emb, _, _, lexical = engine.embed(["What is 2 + 2?"])
    ability, _ = engine.score(emb, np.array([14.0], np.float32), lexical=lexical)
    cols = engine.columns(profile)
    want = float(sigmoid(np.array(0.5 * (ability[0, cols[1]] - ability[0, cols[0]]) + 0.2)))
    assert r2.win_probability[0] == 0.5 and r2.win_probability[1] == pytest.approx(want, abs=1e-5)
    # both kinds of data set: a closed-form/open-ended gate on the embedding, counted per kind;
    # with an open-ended pair it serves gate x closed + (1 - gate) x open (router.scoring.win_rate)
    gate = manifest["head"]["gate"]
    assert len(gate["weight"]) == 384 and gate["closed_prompts"] > 0 and gate["open_prompts"] > 0
    assert 0.5 < manifest["metrics"]["gate"]["auc"] <= 1.0
    opened = WinPair(first="mixtral-8x7b-instruct-v0.1", second="gpt-4-1106-preview", scale=2.0, bias=-1.0, n=500)
    head_spec = head_spec.model_copy(update={"open_win_pairs": [opened]})
    gated = RoutingEngine(dataclasses.replace(model, manifest=model.manifest.model_copy(update={"head": head_spec})))
    (r3,) = gated.route_batch([RouteQuery("What is 2 + 2?", profile)])
    closed = float(sigmoid(np.array(emb[0] @ np.array(gate["weight"], np.float32) + gate["bias"])))
    diff = ability[0, cols[1]] - ability[0, cols[0]]
    want_open = float(sigmoid(np.array(2.0 * diff + 1.0)))  # P(gpt-4 beats mixtral) from the stored (mixtral, gpt-4)
    assert r3.win_probability[1] == pytest.approx(closed * want + (1 - closed) * want_open, abs=1e-5)
    # tracked: the run holds the config, the figures and the files; the version is registered
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.params["rank"] == str(cfg.rank) and "mmlu.log_loss" in run.data.metrics
    assert manifest["mlflow_run_id"] == out["mlflow_run_id"]
    (mv,) = client.search_model_versions("name='tier-router'")
    assert mv.tags["manifest_version"] == manifest["version"] and mv.run_id == out["mlflow_run_id"]
    # same config, same data: same version name (reproducible, fixed seeds)
    again = fit(cfg)
    assert again["out_dir"] == out["out_dir"]
    assert json.loads((version_dir / "manifest.json").read_text())["head"]["sha256"] == manifest["head"]["sha256"]


def test_export_refuses_a_head_that_onnx_disagrees_with(tmp_path):
    rng = np.random.default_rng(0)
    head = WinRateHead()
    head.weight_ = rng.normal(size=(8, 4)).astype(np.float32)  # 6-d embedding + 2 length features
    head.bias_ = rng.normal(size=4).astype(np.float32)
    X = rng.normal(size=(16, 6)).astype(np.float32)
    chars = rng.integers(1, 5000, size=16).astype(np.float32)
    assert export_head(head, tmp_path / "ok.onnx", X, chars) < 1e-4

    class Lying(WinRateHead):
        def logits(self, X, tokens=None):  # what training believes differs from what the graph computes
            a, d = super().logits(X, tokens)
            return a + 0.01, d

    liar = Lying()
    liar.weight_, liar.bias_ = head.weight_, head.bias_
    with pytest.raises(RuntimeError, match="differs from the trained head"):
        export_head(liar, tmp_path / "bad.onnx", X, chars)
    assert not (tmp_path / "bad.onnx").exists()


def test_export_carries_the_hidden_layer(tmp_path):
    rng = np.random.default_rng(1)
    head = WinRateHead(hidden=5)
    head.hidden_weight_ = rng.normal(size=(8, 5)).astype(np.float32)  # [6-d embedding, 2 length features]
    head.hidden_bias_ = rng.normal(size=5).astype(np.float32)
    head.weight_ = rng.normal(size=(13, 4)).astype(np.float32)  # x' = [x, relu(x W1 + c1)]
    head.bias_ = rng.normal(size=4).astype(np.float32)
    X = rng.normal(size=(16, 6)).astype(np.float32)
    chars = rng.integers(1, 5000, size=16).astype(np.float32)
    assert export_head(head, tmp_path / "h.onnx", X, chars) < 1e-4
    # the ReLU matters: some units are off on these inputs, so a linear head could not match
    widened = head.widen(np.hstack([X, length_features(chars)]).astype(np.float32))
    assert (widened[:, 8:] == 0).any() and (widened[:, 8:] > 0).any()


def test_a_head_with_lexical_features_is_exported_loaded_and_served_as_trained(tmp_path):
    from router.lexical import Tokens
    from training.fit import prepare

    cfg = FitConfig(
        data_dir=str(require_data()),
        models_dir=str(tmp_path),
        limit=60,
        steps=30,
        lexical_l2=1e-4,
        lexical_min_df=2,
        track=False,
        encoder_dir=str(MODELS / "encoder" / "all-MiniLM-L6-v2-first2-int8"),
    )
    out = fit(cfg)
    version_dir = tmp_path / (tmp_path / "DEFAULT").read_text().strip()
    assert out["out_dir"] == str(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    lex = manifest["head"]["lexicon"]
    assert lex["file"] == "lexicon.npz" and lex["features"] > 50 and lex["min_df"] == 2
    model = load_model(version_dir, device="cpu")
    assert model.lexicon is not None and model.lexicon.size == lex["features"]
    engine = RoutingEngine(model)
    # what the server computes for a prompt is what the trained head computes for it
    prep = prepare(cfg)
    prompts = prep.data.prompts[:5] + ["Which of the following is true?"]
    emb, _, _, lexical = engine.embed(prompts)
    assert lexical is not None and (lexical[0] < model.lexicon.size).any()
    served, _ = engine.score(emb, np.array([len(p) for p in prompts], np.float32), lexical=lexical)
    tok = model.tokenizer.encode(prompts)
    lex_vocab = model.tokenizer.vocab_size
    # a head refitted the same way gives the same logits (fixed seeds); its words move them
    from training.fit import train_head

    head = train_head(cfg, prep)
    X = np.hstack([emb, length_features([len(p) for p in prompts])]).astype(np.float32)
    want, _ = head.logits(X, Tokens(tok.input_ids, tok.lengths, lex_vocab))
    np.testing.assert_allclose(served, want, atol=1e-4)
    no_words = Tokens(np.zeros((len(prompts), 2), np.int64), np.full(len(prompts), 2, np.int64), lex_vocab)
    assert np.abs(head.logits(X, no_words)[0] - want).max() > 1e-3
    with pytest.raises(ValueError, match="lexical"):
        engine.score(emb, np.array([len(p) for p in prompts], np.float32))
    # a lexicon that does not match the manifest is refused at load
    (version_dir / "lexicon.npz").write_bytes(b"not a lexicon")
    from router.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="lexicon"):
        load_model(version_dir, device="cpu")


@pytest.mark.slow
def test_shipped_encoder_matches_sentence_transformers(model_dir):
    from training.data import read_jsonl
    from training.export import encoder_parity

    data = require_data()
    texts = [str(r["prompt"]) for r in read_jsonl(data / "mmlu.jsonl.gz")[:1000:25]]
    texts += [str(r["prompt"]) for r in read_jsonl(data / "alpaca_eval.jsonl.gz")[:400:10]]
    source = json.loads((model_dir / "manifest.json").read_text())["encoder"]["source"]
    cut = re.match(r"first (\d+) of", source.get("layers", ""))  # a MiniLM cut to its first layers (make model)
    layers = int(cut.group(1)) if cut else None
    stats = encoder_parity(model_dir / "encoder.onnx", model_dir / "tokenizer.json", texts, 256, layers=layers)
    assert stats["mean"] >= 0.99, stats


def _bar_terms(rng: np.random.Generator, X: np.ndarray, n_models: int = 2):
    """Synthetic correctness outcomes (MMLU-style "bar" terms) that depend on X."""
    from training.model import Terms

    n = len(X)
    truth = X[:, :3] @ rng.normal(size=(3, n_models))
    row = np.repeat(np.arange(n), n_models)
    model = np.tile(np.arange(n_models), n)
    target = (rng.random(n * n_models) < 1 / (1 + np.exp(-3 * truth.ravel()))).astype(np.float32)
    return Terms(row, model, np.zeros(n * n_models, np.int64), target, ("bar",), 0, n_models)


def test_a_standardized_head_does_not_care_how_each_embedding_dimension_is_scaled(tmp_path):
    """With `standardize` the head is fitted on each embedding dimension's z-score (the
    length features left as they are), so rescaling a dimension changes nothing it
    predicts; the standardization is folded into the exported weights, which ONNX runs
    on the raw embedding."""
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(300, 6)).astype(np.float32)
    chars = rng.integers(10, 3000, size=300).astype(np.float32)
    terms = _bar_terms(rng, emb)
    stretch = np.array([0.02, 5.0, 1.0, 0.3, 40.0, 1.0], np.float32)  # a few dimensions 100x apart
    X = np.hstack([emb, length_features(chars)]).astype(np.float32)
    X_stretched = np.hstack([emb * stretch, length_features(chars)]).astype(np.float32)
    # a few L-BFGS steps: the same path from the same start (longer runs of a non-convex fit
    # drift apart from float rounding alone)
    kw = dict(hidden=4, steps=5, lexical_l2=None)

    def quality(head: WinRateHead, X: np.ndarray) -> np.ndarray:
        ability, difficulty = head.logits(X)
        return 1 / (1 + np.exp(-(ability - difficulty[:, None])))

    a = WinRateHead(standardize=True, **kw).fit(X, terms)
    b = WinRateHead(standardize=True, **kw).fit(X_stretched, terms)
    np.testing.assert_allclose(quality(a, X), quality(b, X_stretched), atol=1e-4)
    # without it the ridge weighs each dimension by its raw scale, and the fit moves
    c = WinRateHead(standardize=False, **kw).fit(X, terms)
    d = WinRateHead(standardize=False, **kw).fit(X_stretched, terms)
    assert np.abs(quality(c, X) - quality(d, X_stretched)).max() > 0.1
    # folded into the raw-input weights (the hidden layer's too): ONNX on the stretched embedding agrees
    assert export_head(b, tmp_path / "std.onnx", emb * stretch, chars) < 1e-4


def test_a_bool_head_setting_is_read_as_true_or_false_on_the_command_line():
    import argparse

    from training.fit import arg_type
    from training.model import HeadConfig

    read = arg_type(HeadConfig, "standardize")
    assert read("false") is False and read("No") is False and read("0") is False
    assert read("true") is True and read("on") is True
    with pytest.raises(argparse.ArgumentTypeError, match="true or false"):
        read("maybe")
    assert arg_type(HeadConfig, "hidden") is int


def test_shipped_win_probability_speaks_the_terms_of_each_kind_of_request(loaded_model):
    """On the held-out fold the shipped model never trained on: the gate tells MMLU questions
    from AlpacaEval instructions, and P(frontier beats mid) on the instructions is about the rate
    the judge preferred GPT-4 Turbo, where the closed-form calibration alone is far off."""
    from router.profiles import load_profiles
    from tests.conftest import REPO
    from training import data as D

    data = D.load(["mmlu", "alpaca_eval_binary"], require_data())
    held = D.folds(data.prompts, 10) == 0
    profile = load_profiles(REPO / "config" / "profiles.toml")["routellm-pair"].model_copy(
        update={"cascade_margin": None})
    engine = RoutingEngine(loaded_model)
    kinds = data.row_dataset()
    out = {}
    for name in ("mmlu", "alpaca_eval_binary"):
        rows, models, mat = data.outcome_matrix(name)
        rows, mat = rows[held[rows]][:120], mat[held[rows]][:120]
        assert (kinds[rows] == data.datasets.index(name)).all()
        texts = [data.prompts[r] for r in rows]
        results = engine.route_batch([RouteQuery(t, profile) for t in texts])
        emb, _, _, lexical = engine.embed(texts)
        gate = loaded_model.manifest.head.gate
        closed = 1 / (1 + np.exp(-(emb @ np.array(gate.weight, np.float32) + gate.bias)))
        win = np.array([r.win_probability[1] for r in results])
        chars = np.array([len(t) for t in texts], np.float32)
        ability, _ = engine.score(emb, chars, lexical=lexical)
        cols = engine.columns(profile)
        closed_only = engine.win_params(profile).closed
        diff = ability[:, cols[1]] - ability[:, cols[0]]
        no_gate = 1 / (1 + np.exp(-(closed_only[0][1] * diff + closed_only[1][1])))
        weak = mat[:, models.index("mixtral-8x7b-instruct-v0.1")]
        strong = mat[:, models.index("gpt-4-1106-preview")] if name == "mmlu" else np.full(len(rows), 0.5)
        beaten = np.where(strong > weak, 1.0, np.where(strong < weak, 0.0, 0.5))
        out[name] = (closed.mean(), win.mean(), no_gate.mean(), beaten.mean(), beaten.std() / np.sqrt(len(rows)))
    (g_m, win_m, _, seen_m, se_m), (g_a, win_a, no_gate_a, seen_a, se_a) = out["mmlu"], out["alpaca_eval_binary"]
    assert g_m > 0.9 and g_a < 0.15
    # within sampling noise of the rate seen (3 standard errors: 0.09 on 120 MMLU prompts, 0.11 on
    # 81 AlpacaEval ones); the closed-form calibration alone is further off than that on AlpacaEval
    assert abs(win_m - seen_m) < 3 * se_m  # MMLU: unchanged in kind, ties count one half
    assert abs(win_a - seen_a) < 3 * se_a < abs(no_gate_a - seen_a)
