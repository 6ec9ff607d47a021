"""Read a llama.cpp GGUF file of a Gemma model: config from its metadata, weights dequantized to float32.

The keys every Gemma GGUF shares are read here; what differs per family (its metadata under llama.cpp's names, its
tensor names) is the family table's (models/families.py, pointing into models/gguf_arch.py). One value change: a
GGUF stores each RMSNorm's scale itself, norm_offset + w (convert_hf_to_gguf.py adds 1 to Gemma 1-3's w, Gemma 4
scales by w), and we store w.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import GemmaConfig
from .families import FAMILIES, Family, config_from_dict, family_of

GGUF_ARCHITECTURES: dict[str, Family] = {f.gguf_architecture: f for f in FAMILIES.values()}


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
    family = GGUF_ARCHITECTURES[arch]
    key = lambda name, default=None: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    values = {
        "model_type": family.model_type,
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
    values = {k: v for k, v in values.items() if v is not None}
    values.update((k, v) for k, v in family.gguf_values(reader, key).items() if v is not None)
    return config_from_dict(values)


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's llama.cpp type name (F32, Q8_0, Q5_0, Q4_K...) by its Hugging Face name."""
    path = Path(path)
    reader = _reader(path)
    config = _config(reader, path)
    name = family_of(config).gguf_names(config)
    return {name(t.name): t.tensor_type.name for t in reader.tensors if name(t.name)}


def gguf_tensors(path: str | Path) -> tuple[GemmaConfig, int, Iterator[tuple[str, torch.Tensor]]]:
    """The config, the number of tensors, and an iterator of (Hugging Face name, float32 tensor)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    config = _config(reader, path)

    family = family_of(config)
    names, offset = family.gguf_names(config), family.norm_offset

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
            if offset and name.endswith("norm.weight"):
                array = array - offset  # llama.cpp stores the scale, offset + w
            yield name, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    return config, sum(names(t.name) is not None for t in reader.tensors), tensors()
