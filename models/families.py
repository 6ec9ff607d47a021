"""The model families, one table entry each: what loading, GGUF reading, config parsing and the exporter need to know
of a family beyond its own module. A new family is an entry here, its decoder module (with its TASK_CLASSES and
rope_inv_freq), its config class in config.py and, for GGUF files, its pair of functions in gguf_arch.py.

config_from_dict and load_config live here: they pick a config's class from its model_type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import gemma, gemma4, gguf_arch
from .config import Gemma2Config, Gemma3TextConfig, Gemma4TextConfig, GemmaConfig


def _uses_every_key(config: GemmaConfig, key: str) -> bool:
    return False


@dataclass(frozen=True)
class Family:
    config_class: type[GemmaConfig]
    task_classes: Mapping[str, type[nn.Module]]  # task -> module, built as cls(config, precision, kv_layout, ring)
    rope_inv_freq: Callable[[GemmaConfig, str], torch.Tensor]  # (config, layer type) -> [head_dim / 2]
    # RMSNorm scales by norm_offset + w: 1.0 where checkpoints store w around 0 (Gemma 1-3), 0.0 where they store the
    # scale itself (Gemma 4). GGUF files store the scale for every family; random weights put it around 1.
    norm_offset: float
    # q·k is not scaled: the trained q and k norms carry 1/sqrt(head_dim), so random ones get head_dim^-1/4 each.
    unscaled_attention: bool
    gguf_architecture: str  # llama.cpp's general.architecture
    gguf_values: Callable[[Any, Callable], dict]  # (reader, key) -> config values beyond the keys every GGUF has
    gguf_names: Callable[[GemmaConfig], Callable[[str], str | None]]  # GGUF tensor name -> ours (None: derived)
    multimodal_type: str | None = None  # model_type of the multimodal checkpoints holding this one as text_config
    # Tensors a checkpoint may carry that the decoder has no use for (Gemma 4: KV-shared layers' K/V, other towers).
    skip_checkpoint_key: Callable[[GemmaConfig, str], bool] = _uses_every_key
    # onnxruntime-genai's model type (its builder's architecture, lower-cased, without ForCausalLM); None: its
    # config cannot describe our graph
    genai_type: str | None = None

    @property
    def model_type(self) -> str:
        return self.config_class.model_type  # the class's default: config.json's model_type


_GEMMA_1_TO_3 = dict(task_classes=gemma.TASK_CLASSES, rope_inv_freq=gemma.rope_inv_freq, norm_offset=1.0,
                     unscaled_attention=False, gguf_names=gguf_arch.llama_cpp_names)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(GemmaConfig, **_GEMMA_1_TO_3, gguf_architecture="gemma", gguf_values=gguf_arch.gemma_values,
           genai_type="gemma"),
    Family(Gemma2Config, **_GEMMA_1_TO_3, gguf_architecture="gemma2", gguf_values=gguf_arch.gemma2_values,
           genai_type="gemma2"),
    Family(Gemma3TextConfig, **_GEMMA_1_TO_3, gguf_architecture="gemma3", gguf_values=gguf_arch.gemma3_values,
           multimodal_type="gemma3", genai_type="gemma3_text"),
    # onnxruntime-genai's config has one head_size and KV head count, and a past for every layer: no genai_type
    Family(Gemma4TextConfig, task_classes=gemma4.TASK_CLASSES, rope_inv_freq=gemma4.rope_inv_freq, norm_offset=0.0,
           unscaled_attention=True, gguf_architecture="gemma4", gguf_values=gguf_arch.gemma4_values,
           gguf_names=gguf_arch.tensor_map_names, multimodal_type="gemma4",
           skip_checkpoint_key=gemma4.unused_checkpoint_key),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
TASKS = tuple(dict.fromkeys(task for f in FAMILIES.values() for task in f.task_classes))  # every family's, in order
_MULTIMODAL = {f.multimodal_type: f for f in FAMILIES.values() if f.multimodal_type}


def family_of(config: GemmaConfig) -> Family:
    return FAMILIES[config.model_type]  # every config class is a family's (GemmaConfig.__post_init__ checks)


def task_class(config: GemmaConfig, task: str) -> type[nn.Module]:
    """The module of `task` for the config's family (Gemma 4 has no classification heads)."""
    classes = family_of(config).task_classes
    if task not in classes:
        raise ValueError(f"task {task!r} is not supported for {config.model_type}; supported: {', '.join(classes)}")
    return classes[task]


def config_from_dict(values: dict[str, Any]) -> GemmaConfig:
    """The family's config from a Hugging Face config dict (a multimodal Gemma 3 or 4 gives its text part)."""
    model_type = values.get("model_type")
    if model_type in _MULTIMODAL and "text_config" in values:
        model_type = _MULTIMODAL[model_type].model_type
        values = {**values["text_config"], "model_type": model_type}
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type].config_class.from_dict(values)


def load_config(path: str | Path) -> GemmaConfig:
    """Read a `config.json` file (or the one in a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a Hugging Face config.json")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
    return config_from_dict(values)
