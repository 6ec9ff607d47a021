"""Export-friendly PyTorch Gemma (families gemma, gemma2, gemma3_text, gemma4_text) and weight loading."""

from .config import GemmaConfig, Gemma2Config, Gemma3TextConfig, Gemma4TextConfig
from .families import FAMILIES, SUPPORTED_MODEL_TYPES, TASKS, Family, config_from_dict, load_config
from .gemma import (
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    GemmaForTokenClassification,
    GemmaModel,
    Precision,
    empty_past,
    position_ids_from_mask,
)
from .loading import Checkpoint, load_model, random_model, resolve

__all__ = [
    "GemmaConfig", "Gemma2Config", "Gemma3TextConfig", "Gemma4TextConfig",
    "FAMILIES", "SUPPORTED_MODEL_TYPES", "TASKS", "Family", "config_from_dict", "load_config",
    "GemmaForCausalLM", "GemmaForSequenceClassification", "GemmaForTokenClassification", "GemmaModel",
    "Precision", "empty_past", "position_ids_from_mask",
    "Checkpoint", "load_model", "random_model", "resolve",
]
