"""TensorRT engines built and run: needs an NVIDIA GPU with TensorRT 10 and cuda-python
(`pip install -e '.[trt,test]'`). Marked gpu: deselected by default, run with `scripts/test.sh -m gpu`;
on a machine without them every test here skips with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from exporter import ExportOptions, export
from exporter.cli import parity_command
from exporter.trt.build import build_artifact_engine
from runtime import load
from runtime.trt_device import TensorRTUnavailable, current_device, import_tensorrt

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def gpu():
    try:
        import_tensorrt()
        return current_device()
    except TensorRTUnavailable as e:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {e.reason}")


def _artifact(root, name, **options):
    folder = root / name
    export("random:tiny-gemma3", folder, ExportOptions(target="trt", progress=False, max_batch_size=2,
                                                        max_length=96, max_input_len=16, **options))
    return folder


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return _artifact(tmp_path_factory.mktemp("gpu"), "fp16")


def test_engine_is_recorded_for_this_gpu(fp16, gpu):
    model = load(fp16)  # auto: the engine
    engine = model.manifest.engines[0]
    assert engine.gpu == gpu.name and engine.compute_capability == gpu.compute_capability
    assert engine.tensorrt_version == import_tensorrt().__version__
    assert type(model.backend).__name__ == "TensorRTBackend"


def test_engine_generates_onnxruntimes_greedy_tokens(fp16):
    ids = np.array([[0, 0, 0, 5, 9, 11, 3], [8, 4, 4, 2, 7, 1, 30]])  # left-padded row and a full row
    mask = (ids != 0).astype(np.int64)
    engine = load(fp16).generate(ids, mask, max_new_tokens=24)
    onnxruntime = load(fp16, backend="onnxruntime").generate(ids, mask, max_new_tokens=24)
    new = slice(ids.shape[1], None)  # the generated tokens: the prompt agrees by construction
    assert (engine[:, new] == onnxruntime[:, new]).mean() >= 0.95  # fp16 kernels differ; near-ties may flip late


def test_prompt_longer_than_max_input_len_is_fed_in_chunks(fp16):
    ids = np.arange(3, 43)[None]  # 40 tokens, the prefill profile takes 16
    mask = np.ones_like(ids)
    engine, ort = load(fp16).backend, load(fp16, backend="onnxruntime").backend
    for backend in (engine, ort):
        backend.reset(1, 60)
    a = engine.forward(ids, mask, np.arange(40)[None], all_logits=True)
    b = ort.forward(ids, mask, np.arange(40)[None], all_logits=True)
    assert a.shape == b.shape == (1, 40, 512)
    assert np.abs(a - b).max() < 0.5


def test_trim_keeps_the_prefix(fp16):
    backend = load(fp16).backend
    ids = np.arange(3, 13)[None]
    backend.reset(1, 32)
    backend.forward(ids, np.ones_like(ids), np.arange(10)[None])
    backend.trim(6)
    again = backend.forward(ids[:, 6:], np.ones_like(ids), np.arange(6, 10)[None])
    backend.reset(1, 32)
    fresh = backend.forward(ids, np.ones_like(ids), np.arange(10)[None])
    assert np.abs(again - fresh).max() < 0.05


def test_gemma_parity_on_the_engine(fp16):
    result = CliRunner().invoke(parity_command, [str(fp16), "-m", "random:tiny-gemma3", "--backend", "tensorrt"])
    assert result.exit_code == 0, result.output
    assert "vs ONNX Runtime on the same graph" in result.output


@pytest.mark.parametrize("options", [{"quant": "int4"}, {"dtype": "bf16"}, {"kv_cache": "static"}])
def test_other_flavours_build_and_pass_parity(tmp_path, options):
    folder = _artifact(tmp_path, "flavour", **options)
    result = CliRunner().invoke(parity_command, [str(folder), "-m", "random:tiny-gemma3", "--backend", "tensorrt"])
    assert result.exit_code == 0, result.output


def test_resume_build_on_the_same_gpu_replaces_its_engine_entry(fp16):
    manifest = build_artifact_engine(fp16, progress=False)  # rebuilding on the same GPU replaces the entry
    assert len(manifest.engines) == 1


@pytest.mark.real
def test_real_model_engine(tmp_path):
    folder = tmp_path / "real"
    export("gemma3-270m", folder, ExportOptions(target="trt", progress=False, max_length=512, max_input_len=128))
    result = CliRunner().invoke(parity_command, [str(folder), "-m", "gemma3-270m", "--backend", "tensorrt"])
    assert result.exit_code == 0, result.output
