"""Export-friendly PyTorch Gemma (families gemma, gemma2, gemma3_text, gemma4_text) and weight loading."""

from .config import (
    SUPPORTED_MODEL_TYPES, GemmaConfig, Gemma2Config, Gemma3TextConfig, Gemma4TextConfig, config_from_dict, load_config,
)
from .gemma import (
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    GemmaForTokenClassification,
    GemmaModel,
    Precision,
    empty_past,
    position_ids_from_mask,
)
from .loading import TASKS, Checkpoint, load_model, random_model, resolve

__all__ = [
    "SUPPORTED_MODEL_TYPES", "GemmaConfig", "Gemma2Config", "Gemma3TextConfig", "Gemma4TextConfig", "config_from_dict",
    "load_config",
    "GemmaForCausalLM", "GemmaForSequenceClassification", "GemmaForTokenClassification", "GemmaModel",
    "Precision", "empty_past", "position_ids_from_mask",
    "TASKS", "Checkpoint", "load_model", "random_model", "resolve",
]
