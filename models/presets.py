"""Configs of real Gemma checkpoints (values of their config.json) and tiny ones with the same traits,
for `random:<name>` models in tests and benchmarks where the real weights are out of reach."""

from __future__ import annotations

from .config import GemmaConfig, config_from_dict

_GEMMA1 = dict(model_type="gemma", vocab_size=256000, max_position_embeddings=8192, head_dim=256)
_GEMMA2 = dict(model_type="gemma2", vocab_size=256000, max_position_embeddings=8192, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=4096)
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262144, max_position_embeddings=32768, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=512, eos_token_id=[1, 106])

PRESETS: dict[str, dict] = {
    # gemma-2b: one KV head, 8 x 256 = 2048 = hidden.
    "gemma-2b": dict(_GEMMA1, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                     num_attention_heads=8, num_key_value_heads=1),
    # gemma-7b: 16 KV heads, 16 x 256 = 4096 != hidden 3072.
    "gemma-7b": dict(_GEMMA1, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16),
    "gemma-2-2b": dict(_GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4),
    "gemma-2-9b": dict(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8),
    "gemma-3-270m": dict(_GEMMA3, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6),
    "gemma-3-1b": dict(_GEMMA3, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1),
    # Tiny configs with each family's traits, for tests: small vocab, a window of 8 to cross quickly.
    "tiny-gemma-2b": dict(_GEMMA1, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "tiny-gemma-7b": dict(_GEMMA1, vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "tiny-gemma2": dict(_GEMMA2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                        sliding_window=8),
    "tiny-gemma3": dict(_GEMMA3, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                        sliding_window=8, eos_token_id=[1],
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
}


def config(name: str) -> GemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (or a path to a config.json)")
    return config_from_dict(dict(PRESETS[name]))
