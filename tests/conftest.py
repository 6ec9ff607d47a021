"""Shared fixtures: the packaged real model (prepared once per machine) and transformers references.

Under pytest-xdist (scripts/test.sh runs two workers) the session's artifacts are exported once for all workers:
`shared_folder` makes each under a lock in the run's common directory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest


@contextlib.contextmanager
def shared_folder(tmp_path_factory, name: str):
    """A folder of the test run that every worker reads, yielded under a lock: the caller exports there what is not
    there yet (an artifact is complete once its manifest.json exists: exports write it last)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common directory
    folder = root / "shared" / name
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        yield folder


def missing(folder: Path) -> bool:
    return not (folder / "manifest.json").is_file()


@pytest.fixture(scope="session")
def real_model_dir():
    """Hugging Face folder of the real Gemma 3 270M, dequantized from the packaged GGUF."""
    from models import packaged

    return packaged.prepare()


@pytest.fixture(scope="session")
def real_reference(real_model_dir):
    """transformers' own Gemma3ForCausalLM on the real weights: the PyTorch reference."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="session")
def real_artifact(tmp_path_factory, real_model_dir):
    """The packaged real model exported once per test session (float32, dynamic KV, all logits)."""
    from exporter import ExportOptions, export

    with shared_folder(tmp_path_factory, "real") as root:
        if missing(root / "gemma3-270m"):
            export("gemma3-270m", root / "gemma3-270m", ExportOptions(progress=False))
    return root / "gemma3-270m"


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """tiny-gemma3 (random weights, sliding window 8) in both KV layouts; token ids only."""
    from exporter import ExportOptions, export

    with shared_folder(tmp_path_factory, "tiny") as root:
        dynamic, static = root / "dynamic", root / "static"
        if missing(dynamic):
            export("random:tiny-gemma3", dynamic, ExportOptions(progress=False, verify=False))
        if missing(static):
            export("random:tiny-gemma3", static, ExportOptions(progress=False, verify=False, kv_cache="static",
                                                                max_length=64))
    return {"dynamic": dynamic, "static": static}


@pytest.fixture(scope="session")
def real_static_artifact(tmp_path_factory, real_model_dir):
    """The real model in the form gemma-run serve takes: --target ort --kv-cache static --max-length 8192
    --logits last (verified against PyTorch, rows of their own; the sliding-window layers on GroupQueryAttention's
    windowed cache of 640 slots).
    GEMMA_DEPLOY_REAL_STATIC_ARTIFACT=DIR reuses one."""
    from exporter import ExportOptions, export

    if os.environ.get("GEMMA_DEPLOY_REAL_STATIC_ARTIFACT"):
        return Path(os.environ["GEMMA_DEPLOY_REAL_STATIC_ARTIFACT"])
    with shared_folder(tmp_path_factory, "real-static") as root:
        if missing(root / "gemma3-270m-static"):
            export("gemma3-270m", root / "gemma3-270m-static", ExportOptions(
                target="ort", kv_cache="static", max_length=8192, logits="last", progress=False))
    return root / "gemma3-270m-static"
