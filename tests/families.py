"""The families and their tiny configs (models/presets.py), one table every test module takes its cases from:
a new family is one entry here (as mlx-lm's test runner does it)."""

TINY = {  # preset -> the traits it exercises
    "tiny-gemma-2b": "gemma: one KV head, head_dim independent of hidden / heads",
    "tiny-gemma-7b": "gemma: one KV head per query head, heads x head_dim != hidden",
    "tiny-gemma2": "gemma2: attention and final soft-caps, sandwich norms, window 8 on alternate layers",
    "tiny-gemma3": "gemma3_text: q/k norms, window 8 on five layers of six, dual RoPE with linear scaling",
    "tiny-gemma4": "gemma4_text: global layers of head_dim 32 and one KV head whose values are its keys, v norm, "
                   "proportional RoPE, 3 of 8 layers KV-shared, per-layer embeddings, double-wide MLP on shared layers",
    "tiny-gemma4-moe": "gemma4_text: tiny-gemma4 with 4 experts (top 2) beside the dense MLP",
}
ALL = list(TINY)
ONE_PER_FAMILY = ["tiny-gemma-2b", "tiny-gemma2", "tiny-gemma3"]  # for the tests that export more than once
FAMILY_OF = {"tiny-gemma-2b": "gemma", "tiny-gemma-7b": "gemma", "tiny-gemma2": "gemma2", "tiny-gemma3": "gemma3_text",
             "tiny-gemma4": "gemma4_text", "tiny-gemma4-moe": "gemma4_text"}
FP32_TOL = 1e-4  # models/ against transformers, logits in float32
