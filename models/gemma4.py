"""Export-friendly Gemma 4 text decoder (family gemma4_text), in the explicit-KV style of gemma.py.

What differs from Gemma 1-3 (transformers' modeling_gemma4.py, which this mirrors op for op):
- global (full_attention) layers have their own head_dim (512) and, where `attention_k_eq_v`, their own KV head
  count and no v_proj: the values are the key projection, before the key norm;
- q, k and v are RMS-normed per head (v without a scale); the norms scale by w, not 1 + w; attention scale 1.0;
- RoPE: default on local layers, proportional on global ones (only the first quarter of the angles turn);
- shared KV: the last `num_kv_shared_layers` layers compute no K/V and attend to the keys and values of the last
  earlier layer of their type, so past/present hold the storing layers only (`config.kv_layers`, in that order)
  and `Gemma4Model.kv_source[i]` names the layer whose KV layer i reads;
- per-layer embeddings (PLE): a second table [vocab, layers x per_layer_dim] plus a projection of the embedding,
  feeding a gated residual branch in each layer; a per-layer scalar on each layer's output; a final soft-cap;
- the 26B-A4B's MoE block beside the dense MLP, computed densely (every expert, weighted by the router's top-k, the
  others weighted 0): no data-dependent control flow to trace, at the cost of E/k times the expert FLOPs.

forward(input_ids, position_ids, attention_mask, past) -> (hidden or logits, present), KV layouts as in gemma.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Gemma4TextConfig
from .attention import KV, attention
from .gemma import MLP, GemmaForCausalLM, Precision, check_layout, layer_views, rotate_half, scaled_embedding, trailing


class RMSNorm(nn.Module):
    """Gemma 4 scales by w (its weights start at ones), not 1 + w; `with_scale=False` (the value norm): no weight.
    float32 inside. transformers' Gemma4RMSNorm writes pow(mean(x^2) + eps, -0.5); rsqrt is the same function
    (within an ulp) and traces to the Sqrt and Reciprocal that onnxscript's SimplifiedLayerNormalization rule
    matches, as Gemma 1-3's norms do."""

    def __init__(self, dim: int, eps: float, out_dtype: torch.dtype | None = None, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.out_dtype = out_dtype  # None: the weights' dtype (the input's without weights)
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = getattr(self, "weight", None)
        if weight is not None:
            h = h * weight.float()
        return h.to(self.out_dtype or (weight.dtype if weight is not None else x.dtype))


def rope_inv_freq(config: Gemma4TextConfig, layer_type: str) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies of a layer type, with that type's head_dim. Proportional RoPE turns the
    first partial_rotary_factor of the angles with exponents over the whole head_dim; the rest get 0 (no rotation)."""
    params = config.rope_parameters[layer_type]
    rope_type, theta = params.get("rope_type", "default"), float(params["rope_theta"])
    dim = config.head_dim_of(layer_type)
    if rope_type == "default":
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope_type != "proportional":
        raise ValueError(f"rope_type {rope_type!r} is not supported for gemma4_text; supported: default, proportional")
    angles = int(params.get("partial_rotary_factor", 1.0) * dim // 2)
    turned = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / dim))
    return torch.cat((turned, torch.zeros(dim // 2 - angles))) / params.get("factor", 1.0)


class Attention(nn.Module):
    def __init__(self, config: Gemma4TextConfig, layer: int, precision: Precision):
        super().__init__()
        self.head_dim, self.num_kv_heads = config.layer_dims(layer)
        self.num_heads = config.num_attention_heads
        self.stores_kv = config.kv_source[layer] == layer
        self.scores_dtype = precision.scores
        hidden, bias, eps = config.hidden_size, config.attention_bias, config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps, precision.residual)
        if self.stores_kv:  # shared layers have no K/V weights at all
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
            if not (config.attention_k_eq_v and config.layer_types[layer] == "full_attention"):
                self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, eps, precision.residual)
            self.v_norm = RMSNorm(self.head_dim, eps, with_scale=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x, cos, sin, mask, kv: KV, write_at) -> tuple[torch.Tensor, KV | None, KV]:
        """`kv`: this layer's past if it stores KV, else the keys and values its source layer attended to.
        Returns the output, the present (None for a shared layer) and the keys and values attended to."""
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, S, D]
        q = q.to(cos.dtype)
        q = (q * cos + rotate_half(q) * sin).to(self.scores_dtype)
        if self.stores_kv:
            k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, Hkv, D]
            v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim) if hasattr(self, "v_proj") else k
            dtype = v.dtype
            k = self.k_norm(k).transpose(1, 2).to(cos.dtype)  # [B, Hkv, S, D]
            k = (k * cos + rotate_half(k) * sin).to(dtype)  # the cache's dtype
            v = self.v_norm(v).transpose(1, 2)  # [B, Hkv, S, D]
            past = kv
        else:  # a KV-shared layer attends to its source layer's keys and values and writes nothing
            (k, v), past = kv, None
        out, present, seen = attention(q, k, v, mask, past, write_at)  # scale 1.0: q and k are RMS-normed per head
        return self.o_proj(out), present, seen


class Router(nn.Module):
    """Softmax over the experts of the normed, scaled residual; the top k renormalized, times a per-expert scale."""

    def __init__(self, config: Gemma4TextConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.scalar_root_size = config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, E] weights of every expert for each token, 0 off its top k (TopK and ScatterElements in ONNX)."""
        h = self.norm(x) * self.scale * self.scalar_root_size
        probs = torch.softmax(self.proj(h.to(self.proj.weight.dtype)), dim=-1, dtype=torch.float32)  # [N, E]
        top_w, top_i = torch.topk(probs, k=self.top_k, dim=-1)  # [N, k]
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w * self.per_expert_scale[top_i]
        return torch.zeros_like(probs).scatter(-1, top_i, top_w)


class Experts(nn.Module):
    """Every expert's gelu(gate) * up -> down on every token, summed with the router's weights (0 for the unchosen)."""

    def __init__(self, config: Gemma4TextConfig, precision: Precision):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act_dtype = precision.activations

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, weights, self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2),
                               self.act_dtype)


def experts_forward(x, weights, gate_up: torch.Tensor, down: torch.Tensor, act_dtype) -> torch.Tensor:
    """x [N, H], the router's weights [N, E], gate_up [E, H, 2I] and down [E, I, H] (the export stores them so)."""
    gate, up = torch.matmul(x, gate_up).chunk(2, dim=-1)  # [E, N, I] each
    h = F.gelu(gate.to(act_dtype), approximate="tanh") * up.to(act_dtype)
    out = torch.matmul(h.to(x.dtype), down)  # [E, N, H]
    return (out * weights.t()[:, :, None]).sum(0).to(x.dtype)  # [N, H]


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma4TextConfig, layer: int, precision: Precision):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.dtype = precision.dtype
        self.self_attn = Attention(config, layer, precision)
        self.mlp = MLP(dataclasses.replace(config, intermediate_size=config.intermediate_size_of(layer)), precision)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps, precision.post_norms)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps, precision.post_norms)
        self.register_buffer("layer_scalar", torch.ones(1))  # a checkpoint value (transformers' persistent buffer)
        self.enable_moe_block = config.enable_moe_block
        if config.enable_moe_block:  # 26B-A4B: experts on the attention's output beside the dense MLP
            self.router = Router(config)
            self.experts = Experts(config, precision)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps, precision.post_norms)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps, precision.post_norms)
        self.per_layer_input = bool(config.hidden_size_per_layer_input)
        if self.per_layer_input:  # E2B/E4B: gelu(gate(x)) * this layer's PLE slice, projected back, normed
            self.per_layer_input_gate = nn.Linear(H, config.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(config.hidden_size_per_layer_input, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps, precision.post_norms)

    def forward(self, x, per_layer_input, cos, sin, mask, kv, write_at):
        h, present, seen = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, write_at)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.enable_moe_block:
            flat = x.reshape(-1, x.shape[-1])  # [N, H]: the router and experts read the residual, not the MLP's input
            experts = self.experts(self.pre_feedforward_layernorm_2(flat), self.router(flat)).view(x.shape)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(experts)
        x = x + self.post_feedforward_layernorm(h)
        if self.per_layer_input:
            h = F.gelu(self.per_layer_input_gate(x.to(self.dtype)), approximate="tanh") * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        return x * self.layer_scalar.to(x.dtype), present, seen


class Gemma4Model(nn.Module):
    """The decoder stack; past/present hold (key, value) of the storing layers only, in config.kv_layers order."""

    def __init__(self, config: Gemma4TextConfig, precision: Precision = Precision(), kv_layout: str = "dynamic",
                 ring_size: int | None = None):
        super().__init__()
        check_layout(config, kv_layout, ring_size)
        self.config = config
        self.precision = precision
        self.kv_layout = kv_layout
        self.ring_size = ring_size
        self.layer_types = list(config.layer_types)
        self.kv_source = config.kv_source  # layer -> the layer whose keys and values it attends to
        self.kv_slot = [config.kv_layers.index(src) for src in self.kv_source]  # layer -> its entry of past/present
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i, precision) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision.vocab_table)
        P, L = config.hidden_size_per_layer_input, config.num_hidden_layers
        if P:
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, L * P, config.pad_token_id)
            self.per_layer_model_projection = nn.Linear(config.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.rms_norm_eps)
        for layer_type in dict.fromkeys(self.layer_types):  # in order: a set would change the trace with the hash seed
            self.register_buffer(f"inv_freq_{layer_type}", rope_inv_freq(config, layer_type), persistent=False)

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, S, layers, P]: the token's PLE row (times sqrt(P)) and the normed projection of its embedding
        (times hidden^-0.5), summed, times 2^-0.5 (transformers' get_/project_per_layer_inputs)."""
        B, S = input_ids.shape
        L, P = self.config.num_hidden_layers, self.config.hidden_size_per_layer_input
        table = self.embed_tokens_per_layer.weight
        tokens = self.embed_tokens_per_layer(input_ids) * torch.tensor(math.sqrt(P), dtype=table.dtype)
        proj = self.per_layer_model_projection(x.to(self.precision.dtype)) * self.config.hidden_size**-0.5
        proj = self.per_layer_projection_norm(proj.view(B, S, L, P))  # [B, S, L, P]
        return (proj + tokens.view(B, S, L, P).to(proj.dtype)) * 2.0**-0.5

    def forward(self, input_ids, position_ids, attention_mask, past: list[KV], keep: int = 0):
        """`keep` (the head's logits_to_keep): from the first KV-shared layer on, compute the last `keep` positions
        only (they write no cache), as transformers does when generate keeps one logit."""
        S = input_ids.shape[1]
        x = scaled_embedding(self.embed_tokens(input_ids), self.config.hidden_size, self.precision)
        ple = self.per_layer_inputs(input_ids, x) if hasattr(self, "embed_tokens_per_layer") else None
        views = layer_views(self, S, position_ids, attention_mask, past)

        present: list[KV] = []
        seen: dict[int, KV] = {}  # storing layer -> the keys and values it attended to, for the layers sharing them
        for i, (layer, layer_type) in enumerate(zip(self.layers, self.layer_types)):
            if keep and i == self.config.first_kv_shared_layer:
                x = trailing(x, keep)  # [B, K, H]
                ple = trailing(ple, keep) if ple is not None else None
                # cos, sin [B, 1, K, D] and the mask [B, 1, K, T] of the kept positions; shared layers write nothing
                views = {t: (trailing(cos, keep, 2), trailing(sin, keep, 2), trailing(mask, keep, 2), at)
                         for t, (cos, sin, mask, at) in views.items()}
            source = self.kv_source[i]
            kv = past[self.kv_slot[i]] if source == i else seen[source]
            cos, sin, mask, at = views[layer_type]
            x, kv, attended = layer(x, ple[:, :, i] if ple is not None else None, cos, sin, mask, kv, at)
            if source == i:
                present.append(kv)
                seen[i] = attended
        return self.norm(x), present


class Gemma4ForCausalLM(GemmaForCausalLM):
    """The tied lm_head and final soft-cap of gemma.py's head, over the Gemma 4 decoder."""

    decoder_class = Gemma4Model


TASK_CLASSES = {"text-generation": Gemma4ForCausalLM, "feature-extraction": Gemma4Model}


def unused_checkpoint_key(config: Gemma4TextConfig, key: str) -> bool:
    """Tensors a checkpoint may carry that this decoder has no use for: the K/V weights of KV-shared layers
    (transformers ignores them too) and, in multimodal checkpoints, the vision and audio towers."""
    if key.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")):
        return True
    parts = key.split(".")  # model.layers.{i}.self_attn.{k_proj|v_proj|k_norm|v_norm}.weight
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn" and parts[2].isdigit():
        layer = int(parts[2])
        return layer < config.num_hidden_layers and config.kv_source[layer] != layer and parts[4] in (
            "k_proj", "v_proj", "k_norm", "v_norm")
    return False
