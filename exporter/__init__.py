"""Trace models/ Gemma to ONNX, verify it against PyTorch, and write the artifact the runtime loads."""

from .api import ParityError, export
from .options import ExportOptions

__all__ = ["ExportOptions", "ParityError", "export"]
