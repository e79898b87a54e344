"""Model versions on disk (models/<version>/): manifest checks, and the only place ORT sessions are made."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.lexical import Lexicon
from router.scoring import LENGTH_FEATURES
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_POINTER = "DEFAULT"  # models/DEFAULT holds the name of the version served by default
MANIFEST_FORMAT = 1


class ArtifactError(RuntimeError):
    """A model version that must not be served; the message says what is wrong."""


class EncoderSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    file: str = "encoder.onnx"
    tokenizer: str = "tokenizer.json"
    sha256: str
    dim: int = Field(gt=0)
    max_tokens: int = Field(ge=2)
    input_names: list[str] = ["input_ids", "attention_mask"]
    output_name: str = "embedding"


class WinPair(BaseModel):
    """P(first's answer beats second's) = sigmoid(scale (s_first - s_second) + bias), fitted on
    the prompts where both were graded (router.scoring.pair_calibration)."""

    first: str
    second: str
    scale: float
    bias: float
    n: int = Field(0, ge=0, description="pairwise outcomes it was fitted on")


class GateSpec(BaseModel):
    """router.scoring.closed_form's logistic gate on the embedding: P(closed-form question)."""

    weight: list[float] = Field(min_length=1)
    bias: float
    closed_prompts: int = Field(0, ge=0, description="training prompts from data sets graded right or wrong")
    open_prompts: int = Field(0, ge=0, description="training prompts from data sets judged against a reference")


class LexiconSpec(BaseModel):
    """The head's lexical features (router.lexical): their vocabulary and idf, in an .npz file."""

    file: str = "lexicon.npz"
    sha256: str
    features: int = Field(gt=0)
    min_df: int = Field(ge=1)


class HeadSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    kind: str
    file: str = "head.onnx"
    sha256: str
    input_dim: int = Field(gt=0, description="embedding dimension (length features come on top)")
    features: list[str] = Field(default_factory=list, description="router.scoring.LENGTH_FEATURES")
    models: list[str] = Field(min_length=1)
    win_temperature: float = Field(1.0, gt=0, description="pooled; see router.scoring.pair_calibration")
    win_pairs: list[WinPair] = Field(default_factory=list, description="per-pair calibration; others use 1/T")
    lexicon: LexiconSpec | None = Field(None, description="lexical features beside the embedding, if any")
    # Both or neither: the served win probability mixes win_pairs (closed-form questions) and
    # open_win_pairs (open-ended requests) by the gate's P(closed-form) (router.scoring.win_rate)
    gate: GateSpec | None = Field(None, description="P(closed-form question) from the embedding")
    open_win_pairs: list[WinPair] = Field(
        default_factory=list, description="per-pair calibration on open-ended requests (judged data sets)"
    )


class CascadeSpec(BaseModel):
    """A cheaper first stage (typically the static encoder, with a head fitted on its embeddings)
    for profiles that set `cascade_margin`: router.engine runs it first and the main encoder only
    for the requests whose decision it leaves close. File names are relative to the version."""

    encoder: EncoderSpec
    head: HeadSpec


class Manifest(BaseModel):
    """What a model version says about itself; checked against its files at load."""

    model_config = ConfigDict(extra="allow")

    format: int
    version: str = Field(min_length=1)
    encoder: EncoderSpec
    head: HeadSpec
    cascade: CascadeSpec | None = None
    licenses: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    mlflow_run_id: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_dir(path: Path) -> Path:
    """A version directory as given, or, for a models root, the version its DEFAULT names."""
    if (path / MANIFEST).is_file() or not (path / DEFAULT_POINTER).is_file():
        return path
    return path / (path / DEFAULT_POINTER).read_text("utf-8").strip()


def read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text("utf-8")))
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read manifest: {e}") from e
    except (json.JSONDecodeError, ValidationError) as e:
        raise ArtifactError(f"{path}: invalid manifest: {e}") from e
    if manifest.format != MANIFEST_FORMAT:
        raise ArtifactError(f"{path}: manifest format {manifest.format}, this server reads {MANIFEST_FORMAT}")
    return manifest


def providers_for(device: Literal["auto", "cpu", "cuda"]) -> list[str]:
    """Execution providers in preference order; `auto` takes CUDA when this onnxruntime has it."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ArtifactError(f"device=cuda but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


def make_session(path: Path | bytes, *, providers: list[str], intra_op_threads: int) -> ort.InferenceSession:
    """An ORT session with the project's settings, from a file or serialized model bytes."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads  # 0 = ORT's default, one per physical core
    opts.inter_op_num_threads = 1  # the graphs are sequential; extra pools only contend
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(
            path if isinstance(path, bytes) else str(path), sess_options=opts, providers=providers
        )
    except Exception as e:  # ORT raises several unrelated types for a bad file
        where = "<in-memory model>" if isinstance(path, bytes) else path
        raise ArtifactError(f"{where}: onnxruntime cannot load it: {e}") from e


@dataclass(frozen=True)
class Stage:
    """One encoder and the head fitted on its embeddings, loaded and checked."""

    encoder_spec: EncoderSpec
    head_spec: HeadSpec
    tokenizer: RouterTokenizer
    encoder: ort.InferenceSession
    head: ort.InferenceSession
    lexicon: Lexicon | None = None  # the head's lexical features (router.lexical), if it reads them


@dataclass(frozen=True)
class LoadedModel:
    """A checked model version ready to run."""

    manifest: Manifest
    directory: Path
    tokenizer: RouterTokenizer
    encoder: ort.InferenceSession
    head: ort.InferenceSession
    first_stage: Stage | None = None  # the cascade's cheap stage, when the version has one
    lexicon: Lexicon | None = None  # the main head's lexical features, if it reads them

    @property
    def main_stage(self) -> Stage:
        return Stage(
            self.manifest.encoder, self.manifest.head, self.tokenizer, self.encoder, self.head, self.lexicon
        )

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def models(self) -> list[str]:
        return self.manifest.head.models


def _checked_file(model_dir: Path, name: str, sha256: str, what: str) -> Path:
    path = model_dir / name
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} file named in the manifest is missing")
    actual = sha256_file(path)
    if actual != sha256:
        raise ArtifactError(f"{path}: sha256 {actual[:12]}... but manifest says {sha256[:12]}...")
    return path


def _check_io(session: ort.InferenceSession, path: Path, inputs: list[str], outputs: list[str]) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != inputs or not set(outputs) <= set(got_out):
        raise ArtifactError(
            f"{path}: graph has inputs {got_in} / outputs {got_out}, manifest expects {inputs} / {outputs}"
        )


def _static_dim(session: ort.InferenceSession, which: Literal["in", "out"], index: int) -> int | None:
    shape = (session.get_inputs() if which == "in" else session.get_outputs())[index].shape
    last = shape[-1] if shape else None
    return last if isinstance(last, int) else None


HEAD_INPUTS = ["embedding", "prompt_chars"]
LEXICAL_INPUTS = ["lex_index", "lex_value"]  # a head with lexical features takes these as well
HEAD_OUTPUTS = ["ability", "difficulty"]


def _load_stage(
    model_dir: Path, enc: EncoderSpec, head: HeadSpec, providers: list[str], intra_op_threads: int
) -> Stage:
    if head.input_dim != enc.dim:
        raise ArtifactError(f"{model_dir}: head expects {head.input_dim}-d input, encoder gives {enc.dim}")
    enc_path = _checked_file(model_dir, enc.file, enc.sha256, "encoder")
    head_path = _checked_file(model_dir, head.file, head.sha256, "head")
    tok_path = model_dir / enc.tokenizer
    if not tok_path.is_file():
        raise ArtifactError(f"{tok_path}: tokenizer file named in the manifest is missing")

    encoder = make_session(enc_path, providers=providers, intra_op_threads=intra_op_threads)
    _check_io(encoder, enc_path, enc.input_names, [enc.output_name])
    dim = _static_dim(encoder, "out", 0)
    if dim is not None and dim != enc.dim:
        raise ArtifactError(f"{enc_path}: outputs {dim}-d embeddings, manifest says {enc.dim}")

    tokenizer = RouterTokenizer(tok_path, enc.max_tokens)
    lexicon = None
    if head.lexicon is not None:
        lex_path = _checked_file(model_dir, head.lexicon.file, head.lexicon.sha256, "lexicon")
        try:
            lexicon = Lexicon.load(lex_path)
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{lex_path}: cannot read the lexicon: {e}") from e
        if lexicon.size != head.lexicon.features or lexicon.vocab != tokenizer.vocab_size:
            raise ArtifactError(
                f"{lex_path}: {lexicon.size} features over a {lexicon.vocab}-piece vocabulary, manifest says "
                f"{head.lexicon.features} and the tokenizer has {tokenizer.vocab_size} pieces"
            )
    head_sess = make_session(head_path, providers=providers, intra_op_threads=1)
    _check_io(head_sess, head_path, HEAD_INPUTS + (LEXICAL_INPUTS if lexicon else []), HEAD_OUTPUTS)
    if head.features and head.features != list(LENGTH_FEATURES):
        raise ArtifactError(f"{head_path}: features {head.features}, this server computes {list(LENGTH_FEATURES)}")
    if (d := _static_dim(head_sess, "in", 0)) is not None and d != head.input_dim:
        raise ArtifactError(f"{head_path}: takes {d}-d input, manifest says {head.input_dim}")
    if (m := _static_dim(head_sess, "out", 0)) is not None and m != len(head.models):
        raise ArtifactError(f"{head_path}: scores {m} models, manifest lists {len(head.models)}")
    if head.gate is not None and len(head.gate.weight) != enc.dim:
        raise ArtifactError(
            f"{model_dir}: the head's gate has {len(head.gate.weight)} weights, the encoder gives {enc.dim}-d"
        )
    return Stage(enc, head, tokenizer, encoder, head_sess, lexicon)


def load_model(
    model_dir: Path,
    *,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    intra_op_threads: int = 0,
) -> LoadedModel:
    """Load and check a model version; any mismatch is an ArtifactError, never a half-loaded model."""
    model_dir = resolve_model_dir(model_dir)
    manifest = read_manifest(model_dir)
    providers = providers_for(device)
    main = _load_stage(model_dir, manifest.encoder, manifest.head, providers, intra_op_threads)
    first = None
    if (cascade := manifest.cascade) is not None:
        if cascade.head.models != manifest.head.models:
            raise ArtifactError(
                f"{model_dir}: the cascade's head scores {cascade.head.models}, the main head {manifest.head.models}"
            )
        first = _load_stage(model_dir, cascade.encoder, cascade.head, providers, intra_op_threads)
    log.info(
        "loaded model %s from %s (encoder %s%s, %d models, providers %s)",
        manifest.version,
        model_dir,
        manifest.encoder.name,
        f", cascade first stage {first.encoder_spec.name}" if first else "",
        len(manifest.head.models),
        main.encoder.get_providers(),
    )
    return LoadedModel(manifest, model_dir, main.tokenizer, main.encoder, main.head, first, main.lexicon)
