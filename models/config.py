"""Configs of the Gemma text decoders, one dataclass per family.

Field names are those of the Hugging Face `config.json`; `from_dict` ignores unknown keys and derived
values are filled in `__post_init__` (as mlx-lm's `models/base.py` does). `config_from_dict` and `load_config`
(models/families.py) pick the class of a config's model_type from the family table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

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
        own = type(self).model_type  # each class is one family's (models/families.py picks it by model_type)
        if self.model_type != own:
            raise ValueError(f"model_type {self.model_type!r} given to {type(self).__name__}, the config of {own!r}; "
                             "build configs with models.config_from_dict, which picks the class")
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

    @property
    def kv_layers(self) -> list[int]:
        """The layers that store a KV cache, in the order of past/present: every layer before Gemma 4."""
        return list(range(self.num_hidden_layers))

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of a layer's keys and values."""
        return self.num_key_value_heads, self.head_dim

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of keys and values a token adds to the cache (every storing layer, windows not counted)."""
        return sum(2 * math.prod(self.kv_shape(i)) * bytes_per_value for i in self.kv_layers)

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


@dataclass
class Gemma4TextConfig(GemmaConfig):
    """Gemma 4 text (transformers' `gemma4_text`): q/k norms and a value norm, scale 1.0, sandwich norms, global
    layers with their own head_dim (and KV heads where keys are values), proportional partial RoPE on them, the last
    `num_kv_shared_layers` layers reading the KV of an earlier layer, per-layer embeddings, an optional MoE block.

    The rules are those of transformers' configuration_gemma4.py / modeling_gemma4.py (5.x)."""

    model_type: str = "gemma4_text"
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 131072
    hidden_act: str = "gelu_pytorch_tanh"
    sliding_window: int | None = 512
    global_head_dim: int = 512  # full_attention layers' head_dim
    num_global_key_value_heads: int | None = None  # their KV heads, used only with attention_k_eq_v
    attention_k_eq_v: bool = False  # full_attention layers have no v_proj: the values are the keys' projection
    num_kv_shared_layers: int = 0
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 256  # 0: no per-layer embeddings
    use_double_wide_mlp: bool = False  # KV-shared layers' MLP is 2 x intermediate_size
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    use_bidirectional_attention: str | None = None
    per_layer_config: dict | None = None  # transformers 5 configs: {layer: {"head_dim", "num_key_value_heads"}}

    def __post_init__(self):
        if self.use_bidirectional_attention == "all":
            raise ValueError("use_bidirectional_attention 'all' is not supported; supported: None, 'vision' "
                             "(a causal text decoder)")
        if self.layer_types is None:  # transformers' Gemma4TextConfig: five sliding layers of six
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.layer_types:  # transformers forces the last layer global
            self.layer_types[-1] = "full_attention"
        if self.rope_parameters is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0},
            }
        super().__post_init__()
        self.query_pre_attn_scalar = 1.0  # scale 1.0: q and k are RMS-normed per head
        self.sandwich_norms = True
        self.qk_norm = True
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ValueError(f"enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size; got "
                             f"{self.num_experts}, {self.top_k_experts}, {self.moe_intermediate_size}")
        self.kv_source  # checks that every type of shared layer has a storing layer

    def layer_dims(self, layer: int) -> tuple[int, int]:
        """(head_dim, num_kv_heads) of a layer: full_attention layers take global_head_dim, and
        num_global_key_value_heads where attention_k_eq_v (transformers' per_layer_config)."""
        if self.per_layer_config is not None:
            overrides = {int(k): v for k, v in self.per_layer_config.items()}.get(layer, {})
            return overrides.get("head_dim", self.head_dim), overrides.get("num_key_value_heads",
                                                                           self.num_key_value_heads)
        if self.layer_types[layer] != "full_attention":
            return self.head_dim, self.num_key_value_heads
        heads = self.num_global_key_value_heads if self.attention_k_eq_v else None
        return self.global_head_dim, heads or self.num_key_value_heads

    def head_dim_of(self, layer_type: str) -> int:
        return self.layer_dims(self.layer_types.index(layer_type))[0]

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def kv_source(self) -> list[int]:
        """For each layer, the layer whose keys and values it attends to: itself, or for the last
        num_kv_shared_layers layers the last earlier layer of its type (transformers' kv_sharing_modes)."""
        first = self.first_kv_shared_layer
        if first <= 0:
            raise ValueError(f"num_kv_shared_layers {self.num_kv_shared_layers} leaves no layer to store KV; "
                             f"at most {self.num_hidden_layers - 1}")
        last = {t: i for i, t in enumerate(self.layer_types[:first])}
        missing = sorted(set(self.layer_types[first:]) - set(last))
        if missing:
            raise ValueError(f"shared layers of type {missing} have no earlier layer of that type to read KV from; "
                             f"lower num_kv_shared_layers ({self.num_kv_shared_layers}) or change layer_types")
        return [i if i < first else last[t] for i, t in enumerate(self.layer_types)]

    @property
    def kv_layers(self) -> list[int]:
        return list(range(self.first_kv_shared_layer))

    def kv_shape(self, layer: int) -> tuple[int, int]:
        head_dim, heads = self.layer_dims(layer)
        return heads, head_dim

    def kv_bytes_per_token(self, bytes_per_value: int = 2, sharing: bool = True) -> int:
        """Keys and values per token; `sharing=False`: as if every layer stored its own."""
        layers = self.kv_layers if sharing else range(self.num_hidden_layers)
        return sum(2 * math.prod(self.kv_shape(i)) * bytes_per_value for i in layers)

    def intermediate_size_of(self, layer: int) -> int:
        # transformers' Gemma4TextMLP: double width only on KV-shared layers (E2B), not on every layer
        shared = layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1)
