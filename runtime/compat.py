"""transformers' generate on our artifacts: `model.generate(input_ids, max_new_tokens=20, do_sample=True, ...)`.

The shape and the defaults are transformers' (GenerationConfig): greedy unless do_sample, max_length 20, the
options an artifact's generation_config.json sets before those. The rest of the runtime speaks SamplingParams
(runtime/params.py); this layer turns transformers' arguments into them.
"""

from __future__ import annotations

import numpy as np

from .params import SamplingParams

# transformers' GenerationConfig defaults, for what neither the call nor generation_config.json sets
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                         "repetition_penalty": 1.0, "max_length": 20}


class TransformersGenerate:
    """Mixed into GemmaRuntime: generate() as transformers' has it."""

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Prompt + new tokens [batch, prompt + n] int64; a row that ends early (eos) is padded with
        pad_token_id after its end token. Options left None come from the artifact's
        generation_config.json, then transformers' defaults (greedy; max_length 20)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids shape {input_ids.shape} is not supported; expected [batch, length >= 1]")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
        given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repetition_penalty": repetition_penalty, "max_length": max_length}
        o = {k: v if v is not None else self.generation_config.get(k, TRANSFORMERS_DEFAULTS[k]) for k, v in given.items()}
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.get("max_new_tokens") or max(o["max_length"] - input_ids.shape[1], 1)
        params = SamplingParams.from_transformers(max_new_tokens, bool(o["do_sample"]), o["temperature"], o["top_k"],
                                                  o["top_p"], o["min_p"], o["repetition_penalty"], seed)
        eos = self.eos_token_ids if eos_token_id is None else [int(t) for t in np.atleast_1d(eos_token_id)]
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        new = self._generate(input_ids, mask, params, eos, pad)
        return np.concatenate([input_ids, new], axis=1)
