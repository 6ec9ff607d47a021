"""Configs of real Gemma checkpoints (values of their config.json) and tiny ones with the same traits,
for `random:<name>` models in tests and benchmarks where the real weights are out of reach."""

from __future__ import annotations

from .config import GemmaConfig
from .families import config_from_dict

_GEMMA1 = dict(model_type="gemma", vocab_size=256000, max_position_embeddings=8192, head_dim=256)
_GEMMA2 = dict(model_type="gemma2", vocab_size=256000, max_position_embeddings=8192, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=4096)
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262144, max_position_embeddings=32768, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=512, eos_token_id=[1, 106])
# Gemma 4: values of google-deepmind/gemma, gemma/gm/nn/gemma4/_gemma4.py (commit b2dc124b): vocab 262144, head_dim
# 256 (global 512), final soft-cap 30, RoPE 10k local / 1M global with proportion 0.25 (the config's defaults),
# hidden_dim = 4 x embed_dim; context 128K for E2B/E4B, 256K for 26B A4B and 31B (ai.google.dev/gemma/docs/core).
# eos 1 and 106 (end of turn) as Gemma 3's: not in that file, taken from public copies of the checkpoints' config.
_GEMMA4 = dict(model_type="gemma4_text", vocab_size=262144, vocab_size_per_layer_input=262144, head_dim=256,
               global_head_dim=512, final_logit_softcapping=30.0, max_position_embeddings=131072, eos_token_id=[1, 106])
_SIX = ["sliding_attention"] * 5 + ["full_attention"]
_TINY4_TYPES = (["sliding_attention", "sliding_attention", "full_attention"] * 3)[:7] + ["full_attention"]

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
    # _gemma4.py Gemma4_E2B: 35 layers of pattern LLLLG, 20 of them KV-shared, per-layer input 256, the shared
    # layers' FFN twice as wide (override_kv_shared_ffw_hidden), 1 KV head everywhere (no global KV heads, no k_eq_v).
    "gemma-4-e2b": dict(_GEMMA4, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                        num_attention_heads=8, num_key_value_heads=1, sliding_window=512,
                        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, num_kv_shared_layers=20,
                        hidden_size_per_layer_input=256, use_double_wide_mlp=True),
    # _gemma4.py Gemma4_E4B: 42 layers of pattern LLLLLG, 18 KV-shared, per-layer input 256, 2 KV heads.
    "gemma-4-e4b": dict(_GEMMA4, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                        num_attention_heads=8, num_key_value_heads=2, sliding_window=512, layer_types=_SIX * 7,
                        num_kv_shared_layers=18, hidden_size_per_layer_input=256),
    # _gemma4.py Gemma4_31B: 60 layers, window 1024, 16 KV heads local, 4 on global layers whose keys are the
    # values; no PLE, no KV sharing.
    "gemma-4-31b": dict(_GEMMA4, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
                        num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
                        attention_k_eq_v=True, sliding_window=1024, layer_types=_SIX * 10,
                        hidden_size_per_layer_input=0, max_position_embeddings=262144),
    # _gemma4.py Gemma4_26B_A4B: 30 layers, a dense MLP of 2112 beside 128 experts of 704 (top 8), 8 KV heads
    # local, 2 global (k_eq_v); no PLE, no KV sharing.
    "gemma-4-26b-a4b": dict(_GEMMA4, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                            num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                            attention_k_eq_v=True, sliding_window=1024, layer_types=_SIX * 5,
                            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
                            moe_intermediate_size=704, max_position_embeddings=262144),
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
    # Gemma 4 with every trait: global layers (2, 5, 7) with head_dim 32 and 1 KV head whose keys are the values, local
    # ones 16 and 2 heads; layers 5-7 read the KV of layers 2 and 4 (their MLP double-wide); per-layer inputs of 8.
    "tiny-gemma4": dict(_GEMMA4, vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=64,
                        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                        layer_types=_TINY4_TYPES, num_kv_shared_layers=3, hidden_size_per_layer_input=8,
                        use_double_wide_mlp=True, eos_token_id=[1]),
}
# the 26B A4B's MoE block (4 experts, top 2) on top of the rest
PRESETS["tiny-gemma4-moe"] = dict(PRESETS["tiny-gemma4"], enable_moe_block=True, num_experts=4, top_k_experts=2,
                                  moe_intermediate_size=32)


def config(name: str) -> GemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (or a path to a config.json)")
    return config_from_dict(dict(PRESETS[name]))
