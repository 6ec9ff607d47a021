"""Read a llama.cpp GGUF file of a Gemma model: config from its metadata, weights dequantized to float32.

The renames from GGUF to Hugging Face names live here, in one mapping, with the one value change:
llama.cpp stores Gemma's RMSNorm weights as 1 + w (convert_hf_to_gguf.py adds 1), we store w.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import GemmaConfig, config_from_dict

GGUF_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}

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


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's llama.cpp type name (F32, Q8_0, Q5_0, Q4_K...) by its Hugging Face name."""
    path = Path(path)
    reader = _reader(path)
    model_type = _config(reader, path).model_type
    return {hf_name(t.name, model_type): t.tensor_type.name for t in reader.tensors}


def gguf_tensors(path: str | Path) -> tuple[GemmaConfig, int, Iterator[tuple[str, torch.Tensor]]]:
    """The config, the number of tensors, and an iterator of (Hugging Face name, float32 tensor)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    config = _config(reader, path)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_name(t.name, config.model_type)
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                array = np.asarray(t.data, dtype=np.float32)
            else:
                array = dequantize(t.data, t.tensor_type)
            array = array.reshape(shape)
            if name.endswith("norm.weight"):
                array = array - 1.0  # llama.cpp stores 1 + w
            yield name, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    return config, len(reader.tensors), tensors()
