"""gemma-deploy's runtime: generation over exported artifacts with ONNX Runtime.

Imports numpy, onnxruntime (when a model is loaded), tokenizers and jinja2 only: never torch,
transformers or onnx, and nothing else of gemma-deploy.

    import runtime
    model = runtime.load("artifacts/gemma3-270m")
    model.generate(ids, max_new_tokens=20)                       # numpy [batch, prompt + new], as transformers'
    model.generate_text("The capital of France is", runtime.SamplingParams(max_new_tokens=20))
    runtime.pipeline("text-generation", model="artifacts/gemma3-270m")("LLMs generate text through")
"""

from .manifest import SCHEMA_VERSION, ArtifactError, Manifest, read_manifest
from .model import GemmaRuntime, load
from .params import ParamError, SamplingParams
from .pipeline import pipeline
from .sampling import make_sampler
from .session import ChatSession

__all__ = [
    "SCHEMA_VERSION", "ArtifactError", "Manifest", "read_manifest", "ChatSession", "GemmaRuntime", "SamplingParams",
    "ParamError", "load", "pipeline", "make_sampler",
]
