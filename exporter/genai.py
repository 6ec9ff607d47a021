"""genai_config.json: lets onnxruntime-genai run an artifact as it is.

The schema is the one onnxruntime-genai's model builder writes (onnxruntime_genai/models/builders/base.py,
`make_genai_config`, version 0.18): our graph I/O already uses its names (optimum's), so the file only
describes them, the dimensions and the search defaults.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from models.families import FAMILIES
from runtime.manifest import GenerationSpec
from runtime.spec import ArtifactSpec

log = logging.getLogger(__name__)


def genai_config(spec: ArtifactSpec, generation: GenerationSpec, filename: str = "model.onnx") -> dict:
    config, kv = spec.model, spec.kv
    context = spec.context_length
    eos = list(generation.eos_token_ids)
    return {
        "model": {
            "bos_token_id": generation.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": generation.pad_token_id,
            "type": FAMILIES[config.family].genai_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": kv.layout == "static",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, spec: ArtifactSpec, generation: GenerationSpec) -> Path | None:
    """genai_config.json in `folder`, or None for a family onnxruntime-genai cannot describe: its config has one
    head_size and KV head count, and a past for every layer, where Gemma 4 has two of each and KV-shared layers."""
    if FAMILIES[spec.model.family].genai_type is None:
        log.info("no genai_config.json: onnxruntime-genai's config cannot describe a %s graph's KV cache",
                 spec.model.family)
        return None
    path = folder / "genai_config.json"
    path.write_text(json.dumps(genai_config(spec, generation), indent=4))
    return path
