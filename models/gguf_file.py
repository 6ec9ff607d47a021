"""Read a llama.cpp GGUF file of a Gemma model: config from its metadata, weights dequantized to float32.

The renames from GGUF to Hugging Face names live here, with the one value change: llama.cpp stores the RMSNorm
weights of Gemma 1-3 as 1 + w (convert_hf_to_gguf.py adds 1), we store w. Gemma 4 (architecture `gemma4`, whose
norms scale by w) is stored as it is; its names are those the `gguf` package's TensorNameMap gives each tensor of
our decoder, with the converter's own renames (llama.cpp's conversion/gemma.py, Gemma4Model): the router's scale
is `ffn_gate_inp.scale`, the per-expert scale `ffn_down_exps.scale`, layer_scalar and the experts get `.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import GemmaConfig, config_from_dict

GGUF_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}

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


def gemma4_names(config) -> dict[str, str]:
    """GGUF name -> our name of every tensor a Gemma 4 GGUF holds for `config` (rope_freqs.weight, the proportional
    RoPE's table the converter derives from the config, maps to None)."""
    import gguf
    import torch

    from .loading import task_classes

    with torch.device("meta"):
        model = task_classes(config)["text-generation"](config)
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


def hf_name(gguf_name: str, model_type: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in a Gemma decoder")
    layer, part, kind = m.groups()
    name = _LAYER_NAMES[part]
    if model_type == "gemma" and part == "ffn_norm":  # Gemma 1 has no sandwich norms
        name = "post_attention_layernorm"
    return f"model.layers.{layer}.{name}.{kind}"


def _reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError... on a bad file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(path: str | Path) -> GemmaConfig:
    reader = _reader(Path(path))
    return _config(reader, Path(path))


def _config(reader, path: Path) -> GemmaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {arch!r} model; supported GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}"
        )
    key = lambda name, default=None: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    values = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": key("attention.key_length"),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", 0),
    }
    if arch == "gemma4":
        return config_from_dict({**{k: v for k, v in values.items() if v is not None}, **_gemma4_values(reader, key)})
    theta = key("rope.freq_base")
    if arch == "gemma3":
        values["rope_theta"] = theta if theta is not None else 1_000_000.0
        scaling = key("rope.scaling.type")
        if scaling == "linear":
            values["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        values["sliding_window"] = key("attention.sliding_window")
    else:
        values["rope_theta"] = theta if theta is not None else 10000.0
    if arch == "gemma2":
        values["sliding_window"] = key("attention.sliding_window")
        values["attn_logit_softcapping"] = key("attn_logit_softcapping", 50.0)
        values["final_logit_softcapping"] = key("final_logit_softcapping", 30.0)
    values = {k: v for k, v in values.items() if v is not None}
    return config_from_dict(values)


def _gemma4_values(reader, key) -> dict:
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
    return {k: v for k, v in values.items() if v is not None}


def _names(config):
    """GGUF name -> Hugging Face name, for the config's family."""
    if config.model_type == "gemma4_text":
        return gemma4_names(config).get
    return lambda name: hf_name(name, config.model_type)


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's llama.cpp type name (F32, Q8_0, Q5_0, Q4_K...) by its Hugging Face name."""
    path = Path(path)
    reader = _reader(path)
    name = _names(_config(reader, path))
    return {name(t.name): t.tensor_type.name for t in reader.tensors if name(t.name)}


def gguf_tensors(path: str | Path) -> tuple[GemmaConfig, int, Iterator[tuple[str, torch.Tensor]]]:
    """The config, the number of tensors, and an iterator of (Hugging Face name, float32 tensor)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    config = _config(reader, path)

    names = _names(config)
    shifted = config.model_type != "gemma4_text"  # llama.cpp stores Gemma 1-3's norms as 1 + w, Gemma 4's as w

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = names(t.name)
            if name is None:
                continue  # derived from the config (Gemma 4's rope_freqs)
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                array = np.asarray(t.data, dtype=np.float32)
            else:
                array = dequantize(t.data, t.tensor_type)
            array = array.reshape(shape)
            if shifted and name.endswith("norm.weight"):
                array = array - 1.0  # llama.cpp stores 1 + w
            yield name, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    return config, sum(names(t.name) is not None for t in reader.tensors), tensors()
