"""The cascade: a cheap first stage decides what it is sure of, the main encoder the rest.

The two-stage version here is assembled from the two committed versions: the 6-layer MiniLM
model (20261123-b154b88a) as the first stage of the shipped 2-layer one. Any encoder can be a
first stage; what matters is that the two disagree on some prompts, so each answer can be
traced to the stage that gave it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from router.artifacts import ArtifactError, load_model
from router.engine import RouteQuery, RoutingEngine
from router.policy import RequestContext, settled_within
from router.profiles import ProfileSet
from tests.conftest import MODELS, plain_profiles

MAIN, FIRST = "20261123-230cd417", "20261123-b154b88a"

PROMPTS = [
    "What is 2 + 2?",
    "Say hello in French.",
    "Translate 'good morning' into Spanish.",
    "List three primary colors.",
    "Prove that the square root of 2 is irrational.",
    "Write a haiku about autumn leaves.",
    "Explain the difference between TCP and UDP in two sentences.",
    "Derive the closed form of the sum of the first n cubes and prove it by induction.",
    "A train leaves at 3pm going 60 mph; another at 4pm going 80 mph. When does the second catch up?",
    "Summarize the causes of the First World War for a high-school student.",
    "Which of the following is a prime number? A. 21 B. 27 C. 29 D. 33",
    "In contract law, what is consideration? A. a promise B. a bargained-for exchange C. a gift D. an offer",
    "Implement a lock-free multi-producer multi-consumer queue in C++ and argue its linearizability.",
    "What is the capital of Australia?",
    "Give me a recipe for pancakes.",
    "Analyze the time complexity of Dijkstra's algorithm with a Fibonacci heap versus a binary heap.",
    "Who wrote Pride and Prejudice?",
    "What are the tax implications of exercising incentive stock options early under US law?",
    "Rewrite this sentence in passive voice: The cat chased the mouse.",
    "Explain quantum entanglement to a ten-year-old, then to a physics graduate student.",
    "Is 1001 divisible by 7?",
    "Compose a sonnet in iambic pentameter about the sea, with an ABAB CDCD EFEF GG rhyme scheme.",
    "What does the mitochondria do?",
    "Find all real x such that x^4 - 5x^2 + 4 = 0.",
] * 2  # twice: one batch holds copies, which must get the same answer


def assemble(tmp: Path, first: str = FIRST) -> Path:
    """A version directory with MAIN's encoder and head, and `first`'s as the cascade stage."""
    out = tmp / "cascade-version"
    shutil.copytree(MODELS / MAIN, out)
    (out / "cascade").mkdir()
    src = json.loads((MODELS / first / "manifest.json").read_text("utf-8"))
    for name in ("encoder.onnx", "tokenizer.json", "head.onnx"):
        shutil.copy(MODELS / first / name, out / "cascade" / name)
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    manifest["version"] = "cascade-test"
    manifest["cascade"] = {
        "encoder": src["encoder"] | {"file": "cascade/encoder.onnx", "tokenizer": "cascade/tokenizer.json"},
        "head": src["head"] | {"file": "cascade/head.onnx"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), "utf-8")
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RoutingEngine]:
    both = assemble(tmp_path_factory.mktemp("cascade"))
    load = {"device": "cpu", "intra_op_threads": 1}
    return {
        "cascade": RoutingEngine(load_model(both, **load)),  # type: ignore[arg-type]
        "main": RoutingEngine(load_model(MODELS / MAIN, **load)),  # type: ignore[arg-type]
        "first": RoutingEngine(load_model(MODELS / FIRST, **load)),  # type: ignore[arg-type]
    }


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> ProfileSet:
    """The shipped profiles without `cascade_margin` (they ship with one); tests add their own."""
    return ProfileSet.load(plain_profiles(tmp_path_factory.mktemp("profiles")), "default")


def route(engine: RoutingEngine, profile, prompts=PROMPTS):  # type: ignore[no-untyped-def]
    return engine.route_batch([RouteQuery(p, profile) for p in prompts])


def test_a_version_with_a_cascade_loads_both_stages(engines):
    model = engines["cascade"].model
    assert model.first_stage is not None
    assert model.first_stage.encoder_spec.name == "all-MiniLM-L6-v2"
    assert model.manifest.encoder.name == "all-MiniLM-L6-v2-first2"


def test_without_cascade_margin_the_main_encoder_answers(engines, profiles):
    plain = profiles.get("default")
    got, want = route(engines["cascade"], plain), route(engines["main"], plain)
    assert [r.quality for r in got] == [r.quality for r in want]
    assert {(r.encoder, r.cascade) for r in got} == {("all-MiniLM-L6-v2-first2", "")}


def ctx(n: int) -> list[RequestContext]:
    return [RequestContext()] * n


@pytest.mark.parametrize("name", ["default", "rework", "capped-frontier", "budget"])
def test_each_answer_comes_from_the_stage_that_was_sure(engines, profiles, name):
    """Settled by the first stage: exactly the first-stage model's answer (same batch, same
    numbers). Close: the main model's, up to the int8 encoder's batch effects (the main stage
    sees a smaller batch). A tiny margin leaves (almost) all to the first stage, 1 none."""
    base = profiles.get(name)
    alone_first, alone_main = route(engines["first"], base), route(engines["main"], base)
    quality = np.array([r.quality for r in alone_first], np.float32)
    tokens = np.array([r.input_tokens for r in alone_first], np.int64)
    main_quality = np.array([r.quality for r in alone_main], np.float32)
    main_tokens = np.array([r.input_tokens for r in alone_main], np.int64)
    clear = settled_within(0.01, base, main_quality, main_tokens, PROMPTS, ctx(len(PROMPTS)))
    shares = {}
    for margin in (1e-6, 0.03, 0.1, 1.0):
        profile = base.model_copy(update={"cascade_margin": margin})
        got = route(engines["cascade"], profile)
        settled = settled_within(margin, profile, quality, tokens, PROMPTS, ctx(len(PROMPTS)))
        for r, f, m, s, c in zip(got, alone_first, alone_main, settled, clear, strict=True):
            assert r.cascade == ("first" if s else "main")
            if s:
                assert r.encoder == f.encoder == "all-MiniLM-L6-v2"
                assert r.choice == f.choice and r.quality == f.quality and r.win_probability == f.win_probability
            else:
                assert r.encoder == m.encoder == "all-MiniLM-L6-v2-first2"
                assert r.quality == pytest.approx(m.quality, abs=0.02)
                assert r.choice.tier == m.choice.tier or not c  # a batch effect may move a close call
            assert r.embedding.shape == (384,)
        shares[margin] = settled.mean()
    assert shares[1e-6] >= 0.9 and shares[1.0] == 0.0
    assert shares[1e-6] >= shares[0.03] >= shares[0.1] >= shares[1.0]
    # (which margin splits them depends on where the profile's calibrated floors fall)
    assert any(0.0 < shares[m] < 1.0 for m in (0.03, 0.1)), "the test prompts should exercise both stages"


@pytest.mark.parametrize("name", ["default", "rework", "capped-frontier", "budget"])
def test_settled_within_takes_the_decision_already_made(engines, profiles, name):
    """The engine passes its final (unexplored) decision in; settled_within reuses its bounds and agrees."""
    from router.policy import decide

    profile = profiles.get(name)
    got = route(engines["first"], profile)
    quality = np.array([r.quality for r in got], np.float32)
    tokens = np.array([r.input_tokens for r in got], np.int64)
    plain = decide(profile, quality, tokens, PROMPTS, ctx(len(PROMPTS)))
    for margin in (0.01, 0.05):
        np.testing.assert_array_equal(
            settled_within(margin, profile, quality, tokens, PROMPTS, ctx(len(PROMPTS)), plain),
            settled_within(margin, profile, quality, tokens, PROMPTS, ctx(len(PROMPTS))),
        )


def test_a_mixed_batch_routes_each_profile_its_own_way(engines, profiles):
    cascading = profiles.get("default").model_copy(update={"cascade_margin": 0.03})
    plain = profiles.get("routellm-pair")
    queries = [RouteQuery(p, cascading if i % 2 else plain) for i, p in enumerate(PROMPTS)]
    got = engines["cascade"].route_batch(queries)
    stages = {r.encoder for q, r in zip(queries, got, strict=True) if q.profile is cascading}
    assert stages == {"all-MiniLM-L6-v2", "all-MiniLM-L6-v2-first2"}
    for q, r in zip(queries, got, strict=True):
        if q.profile is plain:
            assert r.encoder == "all-MiniLM-L6-v2-first2"
        elif r.encoder == "all-MiniLM-L6-v2":  # the first stage answered: it was sure of this one
            q1 = np.array([r.quality], np.float32)
            assert settled_within(0.03, cascading, q1, np.array([r.input_tokens]), [q.text], ctx(1))[0]


def test_a_cascade_profile_on_a_version_without_one_uses_the_main_encoder(engines, profiles, caplog):
    profile = profiles.get("default").model_copy(update={"cascade_margin": 0.03})
    with caplog.at_level(logging.WARNING, logger="router.engine"):
        got = route(engines["main"], profile)
    assert [r.quality for r in got] == [r.quality for r in route(engines["main"], profiles.get("default"))]
    assert "has no cascade stage" in caplog.text


def test_a_cascade_whose_head_scores_other_models_is_refused(tmp_path):
    out = assemble(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    manifest["cascade"]["head"]["models"] = manifest["cascade"]["head"]["models"][::-1]
    (out / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    with pytest.raises(ArtifactError, match="cascade's head scores"):
        load_model(out, device="cpu")


def test_a_tampered_cascade_file_is_refused(tmp_path):
    out = assemble(tmp_path)
    with (out / "cascade" / "head.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(out, device="cpu")


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_a_margin_outside_0_1_is_refused_naming_the_field(profiles, bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cascade_margin"):
        type(profiles.get("default")).model_validate(profiles.get("default").model_dump() | {"cascade_margin": bad})
