"""Trace models/ Gemma to ONNX, verify it against PyTorch, and write the artifact the runtime loads."""

from .api import ExportOptions, ParityError, export

__all__ = ["ExportOptions", "ParityError", "export"]
