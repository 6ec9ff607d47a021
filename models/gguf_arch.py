"""What a llama.cpp GGUF of each family holds beyond the keys every Gemma shares: its metadata as config values
(`*_values(reader, key)`, `key(name, default)` reading `<architecture>.<name>`) and its tensor names as ours
(`*_names(config)`: a function from a GGUF tensor name to ours, None for a tensor derived from the config).
The family table (models/families.py) points each family at its pair; models/gguf_file.py reads the file.

Gemma 1-3 use llama.cpp's fixed names below. Gemma 4's are those the `gguf` package's TensorNameMap gives each
tensor of our decoder, with the converter's own renames (llama.cpp's conversion/gemma.py, Gemma4Model): the router's
scale is `ffn_gate_inp.scale`, the per-expert scale `ffn_down_exps.scale`, layer_scalar and the experts get `.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

from .config import GemmaConfig, Gemma4TextConfig
from .gemma4 import Gemma4ForCausalLM

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def llama_cpp_names(config: GemmaConfig) -> Callable[[str], str]:
    """Gemma 1-3: llama.cpp's fixed names; a tensor without a counterpart is an error."""
    return lambda name: hf_name(name, config)


def hf_name(gguf_name: str, config: GemmaConfig) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in a Gemma decoder")
    layer, part, kind = m.groups()
    name = _LAYER_NAMES[part]
    if not config.sandwich_norms and part == "ffn_norm":  # Gemma 1: post_attention_layernorm is the MLP's input norm
        name = "post_attention_layernorm"
    return f"model.layers.{layer}.{name}.{kind}"


def tensor_map_names(config: Gemma4TextConfig) -> Callable[[str], str | None]:
    """Gemma 4: the names of gemma4_names, anything else None."""
    return gemma4_names(config).get


def gemma4_names(config: Gemma4TextConfig) -> dict[str, str | None]:
    """GGUF name -> our name of every tensor a Gemma 4 GGUF holds for `config` (rope_freqs.weight, the proportional
    RoPE's table the converter derives from the config, maps to None)."""
    import gguf

    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, config.num_hidden_layers)
    names = {"rope_freqs.weight": None}
    for name in model.state_dict():
        if name == "lm_head.weight":
            continue  # tied: the GGUF holds token_embd only
        base, _, leaf = name.rpartition(".")
        if leaf in ("scale", "per_expert_scale") and base.endswith("router"):
            layer = name.split(".")[2]
            names[f"blk.{layer}.{'ffn_gate_inp' if leaf == 'scale' else 'ffn_down_exps'}.scale"] = name
            continue
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"the gguf package {gguf.__version__ if hasattr(gguf, '__version__') else ''} has no "
                             f"GGUF name for {name}; upgrade it (pip install -U gguf)")
        names[mapped if mapped.endswith((".weight", ".bias")) else mapped + ".weight"] = name
    return names


def gemma_values(reader, key) -> dict:
    theta = key("rope.freq_base")
    return {"rope_theta": theta if theta is not None else 10000.0}


def gemma2_values(reader, key) -> dict:
    return {**gemma_values(reader, key), "sliding_window": key("attention.sliding_window"),
            "attn_logit_softcapping": key("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": key("final_logit_softcapping", 30.0)}


def gemma3_values(reader, key) -> dict:
    theta = key("rope.freq_base")
    values = {"rope_theta": theta if theta is not None else 1_000_000.0,
              "sliding_window": key("attention.sliding_window")}
    if key("rope.scaling.type") == "linear":
        values["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return values


def gemma4_values(reader, key) -> dict:
    """The Gemma 4 config fields that llama.cpp writes per layer or under its own names."""
    layers = key("block_count")
    ffn = key("feed_forward_length")
    ffn = list(ffn) if isinstance(ffn, (list, tuple)) else [ffn] * layers
    sliding = [bool(b) for b in key("attention.sliding_window_pattern")]
    kv_heads = key("attention.head_count_kv")
    kv_heads = list(kv_heads) if isinstance(kv_heads, (list, tuple)) else [kv_heads] * layers
    tensors = {t.name: t for t in reader.tensors}
    first_global = sliding.index(False)
    freqs = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)  # 1 for a turned angle, 1e30 for not
    global_head_dim = key("attention.key_length")
    per_layer = key("embedding_length_per_layer_input") or 0
    values = {
        "intermediate_size": ffn[0],
        "use_double_wide_mlp": any(n != ffn[0] for n in ffn),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "num_key_value_heads": kv_heads[sliding.index(True)] if True in sliding else kv_heads[0],
        "num_global_key_value_heads": kv_heads[first_global],
        "attention_k_eq_v": f"blk.{first_global}.attn_v.weight" not in tensors,
        "head_dim": key("attention.key_length_swa"),
        "global_head_dim": global_head_dim,
        "sliding_window": key("attention.sliding_window"),
        "num_kv_shared_layers": key("attention.shared_kv_layers", 0),
        "final_logit_softcapping": key("final_logit_softcapping"),
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": key("rope.freq_base_swa", 10000.0)},
            "full_attention": {"rope_type": "proportional", "rope_theta": key("rope.freq_base", 1_000_000.0),
                               "partial_rotary_factor": 2 * int((freqs == 1.0).sum()) / global_head_dim},
        },
        "hidden_size_per_layer_input": per_layer,
    }
    if per_layer:
        values["vocab_size_per_layer_input"] = int(tensors["per_layer_token_embd.weight"].shape[-1])
    experts = key("expert_count")
    if experts:
        values.update(enable_moe_block=True, num_experts=experts, top_k_experts=key("expert_used_count"),
                      moe_intermediate_size=key("expert_feed_forward_length"))
    return values
