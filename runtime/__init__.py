"""gemma-deploy's runtime: generation over exported artifacts with ONNX Runtime (TensorRT on GPUs).

Imports numpy, onnxruntime, tokenizers and jinja2 only: never torch, transformers or onnx.

    import runtime
    model = runtime.load("artifacts/gemma3-270m")
    print(model.generate_text("The capital of France is", runtime.GenerationOptions(max_new_tokens=20)))
    runtime.pipeline("text-generation", model="artifacts/gemma3-270m")("LLMs generate text through")
"""

from .manifest import ArtifactError, read_manifest
from .model import ChatSession, GemmaRuntime, GenerationOptions, load
from .pipeline import pipeline
from .sampling import make_sampler

__all__ = [
    "ArtifactError", "read_manifest", "ChatSession", "GemmaRuntime", "GenerationOptions", "load", "pipeline",
    "make_sampler",
]
