import json
import shutil

import pytest

from router.artifacts import ArtifactError, load_model, resolve_model_dir


def copy(model_dir, tmp_path):
    dst = tmp_path / "v"
    shutil.copytree(model_dir, dst)
    return dst


def test_shipped_default_loads_and_describes_itself(loaded_model, model_dir):
    m = loaded_model.manifest
    assert resolve_model_dir(model_dir.parent) == model_dir
    assert m.encoder.dim == 384 and m.head.input_dim == 384
    for model in ("mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview", "gpt-3.5-turbo-0301"):
        assert model in loaded_model.models
    assert any("CC BY-NC 4.0" in v for v in m.licenses.values())
    assert "mmlu_routing" in m.metrics


def test_tampered_file_is_refused(model_dir, tmp_path):
    v = copy(model_dir, tmp_path)
    with (v / "head.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(v, device="cpu")


def test_missing_file_is_refused(model_dir, tmp_path):
    v = copy(model_dir, tmp_path)
    (v / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer file named in the manifest is missing"):
        load_model(v, device="cpu")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["head"].update(models=m["head"]["models"][:-1]), "scores 24 models, manifest lists 23"),
        (lambda m: m["head"].update(input_dim=128), "head expects 128-d input"),
        (lambda m: m.update(format=99), "manifest format 99"),
        (lambda m: m.pop("encoder"), "invalid manifest"),
    ],
)
def test_manifest_mismatch_is_refused(model_dir, tmp_path, edit, match):
    v = copy(model_dir, tmp_path)
    manifest = json.loads((v / "manifest.json").read_text())
    edit(manifest)
    (v / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        load_model(v, device="cpu")


def test_cuda_request_without_cuda_fails_clearly(model_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ArtifactError, match="device=cuda"):
        load_model(model_dir, device="cuda")
