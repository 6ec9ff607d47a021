"""Configs of the Gemma text decoders, one dataclass per family.

Field names are those of the Hugging Face `config.json`; `from_dict` ignores unknown keys and derived
values are filled in `__post_init__` (as mlx-lm's `models/base.py` does).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
# Multimodal Gemma 3 checkpoints keep the text decoder's config under `text_config`.
_TEXT_CONFIG_WRAPPERS = ("gemma3",)
_LEGACY_GELU = ("gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass
class GemmaConfig:
    """Gemma 1 (gemma-2b, gemma-7b): plain pre-norm decoder, one RoPE, no soft-caps."""

    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_activation: str | None = None
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    attention_bias: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    tie_word_embeddings: bool = True
    num_labels: int = 2
    # Family switches; fixed per family, listed here so that one model file reads them all.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    sandwich_norms: bool = field(default=False, init=False)
    qk_norm: bool = field(default=False, init=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # A legacy `hidden_act: gelu` means the tanh approximation (transformers' GemmaConfig says so).
        activation = self.hidden_activation or self.hidden_act
        if activation not in _LEGACY_GELU:
            raise ValueError(f"hidden activation {activation!r} is not supported; Gemma uses gelu_pytorch_tanh")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim

    @property
    def family(self) -> str:
        return self.model_type

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def sliding_window_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]

    def rope(self, layer_type: str) -> tuple[float, float]:
        """(theta, linear scaling factor) of the RoPE used by layers of this type."""
        params = self.rope_parameters or {}
        params = params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear")
        factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
        return float(params.get("rope_theta", self.rope_theta)), factor

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GemmaConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a Hugging Face config.json has them (unset ones left out)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class Gemma2Config(GemmaConfig):
    """Gemma 2: soft-capped attention (50) and final logits (30), norms before and after attention and
    MLP, sliding window 4096 on alternate layers, scale query_pre_attn_scalar^-0.5."""

    model_type: str = "gemma2"
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096

    def __post_init__(self):
        if self.layer_types is None:  # transformers' Gemma2Config: even layers slide
            self.layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        super().__post_init__()
        self.sandwich_norms = True


@dataclass
class Gemma3TextConfig(GemmaConfig):
    """Gemma 3 text: RMSNorm on q and k, no soft-caps, sliding window on five layers of six,
    RoPE theta 10k on local layers and 1M (with the config's scaling) on global ones."""

    model_type: str = "gemma3_text"
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    rope_local_base_freq: float = 10000.0
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.layer_types is None:
            pattern = self.sliding_window_pattern
            self.layer_types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(self.num_hidden_layers)
            ]
        if self.rope_parameters is None or "full_attention" not in self.rope_parameters:
            # transformers 4 configs: flat rope_theta / rope_local_base_freq / rope_scaling.
            full = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
            local = {"rope_type": "default", "rope_theta": self.rope_local_base_freq}
            self.rope_parameters = {"full_attention": full, "sliding_attention": local}
        super().__post_init__()
        self.sandwich_norms = True
        self.qk_norm = True


CONFIG_CLASSES: dict[str, type[GemmaConfig]] = {
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}


def config_from_dict(values: dict[str, Any]) -> GemmaConfig:
    """The family's config from a Hugging Face config dict (a multimodal Gemma 3 gives its text part)."""
    model_type = values.get("model_type")
    if model_type in _TEXT_CONFIG_WRAPPERS and "text_config" in values:
        values = {"model_type": "gemma3_text", **values["text_config"]}
        model_type = "gemma3_text"
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return CONFIG_CLASSES[model_type].from_dict(values)


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
