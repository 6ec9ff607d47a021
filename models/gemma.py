"""Export-friendly Gemma text decoder (families gemma, gemma2, gemma3_text).

The KV cache is explicit: `forward(input_ids, position_ids, attention_mask, past) -> (logits, present)`,
where `past` and `present` are lists of (key, value) tensors [B, num_kv_heads, T, head_dim]. What the
ONNX graph takes and gives is what this function takes and gives.

Precision and the KV layout are given at construction, as mlx-lm's and gpt-fast's models take their args:
`GemmaForCausalLM(config, Precision(...), kv_layout="static")`. Two cache layouts:
- dynamic: past holds the T_past tokens seen so far; present = concat(past, new). Rows of a batch share their
  slots: shorter prompts are left-padded, and attention_mask [B, T_past + S] marks the real tokens.
- static: past is a buffer of `max_length` slots per row, and every row has its own length: its tokens sit at
  slots 0..n-1, and attention_mask [B, T] marks them (T: the longest row's length after this step). A row's S new
  entries go to its own slots n-S..n-1 (n = the row's mask sum), written in place (ONNX's TensorScatter);
  present is the whole updated buffer, and attention reads its first T slots. That is what continuous batching
  needs: rows that joined at different times decode together.
  With `ring_size` R, sliding-window layers keep R slots instead (the window W and one chunk C): token i of a row
  goes to slot i mod R, and a slot holds the row's latest token there. A run feeds a row at most C new tokens and
  never past slot R - 1 (the caller chunks: runtime.spec.KVSpec.chunk_limit), so no query loses a key it sees.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KV, attention
from .config import GemmaConfig

KV_LAYOUTS = ("dynamic", "static")


@dataclass(frozen=True)
class Precision:
    """The dtype of each kind of value, as torch dtypes (the artifact spec's precision section says why each one):
    `dtype` for the layers' weights, the projections and the KV cache; the others may be wider."""

    dtype: torch.dtype = torch.float32
    residual: torch.dtype = torch.float32  # residual stream, embedding scale, q/k norms' outputs, rotary
    scores: torch.dtype = torch.float32  # q·k
    activations: torch.dtype = torch.float32  # gelu(gate)·up
    post_norms: torch.dtype = torch.float32  # the sandwich norms' outputs, which feed the residual
    vocab_table: torch.dtype = torch.float32  # the tied embedding / lm_head, and the final norm's output

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> "Precision":
        return cls(*[dtype] * len(dataclasses.fields(cls)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.out_dtype = out_dtype  # None: the weights' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gemma scales by (1 + w), all in float32, then casts (transformers modular_gemma.py, PR #29402).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(self.out_dtype or self.weight.dtype)


def rope_inv_freq(config: GemmaConfig, layer_type: str) -> torch.Tensor:
    theta, factor = config.rope(layer_type)
    inv_freq = 1.0 / (theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    return inv_freq / factor  # linear scaling (Gemma 3 global layers of the 4B+ models)


def rotary(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Written as transformers writes it (an outer product as MatMul, slices in rotate_half): the trace then
    # has the pattern onnxscript's rotary and cos/sin-cache fusions match (--target ort).
    # float32 whatever the model's dtype (a float16 buffer would fail the MatMul and lose the angle's precision)
    inv_freq = inv_freq.float()[None, :, None].expand(position_ids.shape[0], -1, 1)  # [B, D/2, 1]
    freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, S, D]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, precision: Precision):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping  # Gemma 2 only
        self.scores_dtype = precision.scores
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:  # Gemma 3 normalizes q and k per head, into the (wide) rotation
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, precision.residual)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, precision.residual)

    def forward(self, x, cos, sin, mask, past: KV, write_at: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # Rotated in cos/sin's dtype: float32 in half-precision graphs (a no-op in float32 ones), then back.
        dtype = v.dtype
        q, k = q.to(cos.dtype), k.to(cos.dtype)
        q = (q * cos + rotate_half(q) * sin).to(self.scores_dtype)
        k = (k * cos + rotate_half(k) * sin).to(dtype)  # the cache's dtype
        out, present, _ = attention(q, k, v, mask, past, write_at, self.scaling, self.softcap)
        return self.o_proj(out), present


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig, precision: Precision):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_dtype = precision.activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.gate_proj(x).to(self.act_dtype), approximate="tanh") * self.up_proj(x).to(self.act_dtype)
        return self.down_proj(h.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, precision: Precision):
        super().__init__()
        self.self_attn = Attention(config, precision)
        self.mlp = MLP(config, precision)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:  # Gemma 2 and 3 norm before and after both attention and MLP
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, precision.post_norms)
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, precision.post_norms)
        else:  # Gemma 1's post_attention_layernorm is the MLP's input norm
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, mask, past, write_at):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, write_at)
        if not self.sandwich_norms:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x)), present
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), present


def attention_masks(
    attention_mask: torch.Tensor, seq_len: int, kv_len: int, sliding_window: int | None, static: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean masks [B, 1, S, kv_len] for full and sliding layers.

    Cache slot indices decide causality and the window, as transformers' masking_utils does. Dynamic layout:
    query i sits at slot T - S + i, where T = attention_mask.shape[1] counts the slots in use (pads included).
    Static layout: every row has its own length n (its mask's sum), and its query i sits at slot n - S + i.
    """
    kv_idx = torch.arange(kv_len, device=attention_mask.device)  # [T]
    if static:  # per row: [B, S] query slots, [B, S, T] masks
        q_idx = attention_mask.sum(-1, keepdim=True) - seq_len + torch.arange(seq_len, device=kv_idx.device)
        full = ((kv_idx[None, None, :] <= q_idx[:, :, None]) & attention_mask.bool()[:, None, :])[:, None]
        kv_idx, q_idx = kv_idx[None, None, :], q_idx[:, :, None]
    else:  # shared by the rows: [S] query slots, [S, T] masks
        q_idx = torch.arange(seq_len, device=attention_mask.device) + (attention_mask.shape[1] - seq_len)
        full = (kv_idx[None, :] <= q_idx[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        kv_idx, q_idx = kv_idx[None, :], q_idx[:, None]
    if sliding_window is None:
        return full, None
    window = kv_idx > q_idx - sliding_window
    return full, full & (window[:, None] if static else window[None, None])  # [B, 1, S, T]


def ring_mask(lengths: torch.Tensor, seq_len: int, slots: int, ring_size: int, sliding_window: int) -> torch.Tensor:
    """The mask [B, 1, S, slots] over the first `slots` slots of a sliding-window layer's ring for rows of
    `lengths` tokens after this step, whose last S are the queries.

    Slot j holds the row's latest token p_j = j + R * floor((n - 1 - j) / R) (R the ring size, n the row's length)
    if j < n; query q sees it when p_j <= q and p_j > q - W, the window's rule on the token's index."""
    n = lengths[:, None]  # [B, 1]
    j = torch.arange(slots, device=lengths.device)[None]  # [1, K]
    held = j + ring_size * torch.div((n - 1 - j).clamp(min=0), ring_size, rounding_mode="floor")  # [B, K]
    q = (n - seq_len + torch.arange(seq_len, device=lengths.device))[:, :, None]  # [B, S, 1]
    held = held[:, None, :]
    return ((j < n)[:, None, :] & (held <= q) & (held > q - sliding_window))[:, None]  # [B, 1, S, K]


def check_layout(config: GemmaConfig, kv_layout: str, ring_size: int | None) -> None:
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout {kv_layout!r} is not supported; supported: {', '.join(KV_LAYOUTS)}")
    if ring_size is not None and (kv_layout != "static" or config.sliding_window is None
                                  or ring_size <= config.sliding_window):
        raise ValueError(f"ring_size {ring_size} needs the static layout and a sliding window shorter than it "
                         f"(kv_layout {kv_layout!r}, sliding_window {config.sliding_window})")


def scaled_embedding(x: torch.Tensor, hidden_size: int, precision: Precision) -> torch.Tensor:
    """The embedding times sqrt(hidden_size), in the residual stream's dtype."""
    if precision.residual == precision.dtype:
        # sqrt(hidden_size) is cast to the compute dtype first: 55.4256 becomes 55.5 in bf16 (PR #29402).
        return x.to(precision.dtype) * torch.tensor(math.sqrt(hidden_size), dtype=precision.dtype)
    # float16 graphs keep the residual stream in float32: Gemma's passes 65504 and would turn to inf
    return x.to(precision.residual) * math.sqrt(hidden_size)  # neither the product nor the scale rounded


def layer_views(decoder: nn.Module, S: int, position_ids, attention_mask, past: list[KV]) -> dict[str, tuple]:
    """Per layer type, what its layers take besides x and their past: (cos, sin, mask, write_at). A decoder has
    config, precision, kv_layout, ring_size, layer_types and its inv_freq_<type> buffers."""
    config, static = decoder.config, decoder.kv_layout == "static"
    kv_len = attention_mask.shape[1] if static else past[0][0].shape[2] + S
    lengths = attention_mask.sum(-1)  # [B]
    write_at = lengths - S if static else None  # [B]: each row's first new slot
    full_mask, sliding_mask = attention_masks(attention_mask, S, kv_len, config.sliding_window, static)
    sliding_write = write_at
    if decoder.ring_size is not None:  # sliding layers: their own slots and mask on the ring
        R = decoder.ring_size
        sliding_write = torch.remainder(write_at, R)
        # Every slot of the ring, written or not (a mask costs less than slicing: ONNX Runtime would copy)
        sliding_mask = ring_mask(lengths, S, R, R, config.sliding_window)
    masks = {"full_attention": (full_mask, write_at), "sliding_attention": (sliding_mask, sliding_write)}
    return {t: (*rotary(position_ids, getattr(decoder, f"inv_freq_{t}"), decoder.precision.residual), *masks[t])
            for t in dict.fromkeys(decoder.layer_types)}


class GemmaModel(nn.Module):
    """The decoder stack; returns the last hidden state (feature extraction) and the present KV."""

    def __init__(self, config: GemmaConfig, precision: Precision = Precision(), kv_layout: str = "dynamic",
                 ring_size: int | None = None):
        super().__init__()
        check_layout(config, kv_layout, ring_size)
        self.config = config
        self.precision = precision
        self.kv_layout = kv_layout
        self.ring_size = ring_size  # static: a sliding-window layer's slots (None: max_length, as global layers)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, precision) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision.vocab_table)
        self.layer_types = list(config.layer_types)
        for layer_type in dict.fromkeys(self.layer_types):  # in order: a set would change the trace with the hash seed
            self.register_buffer(f"inv_freq_{layer_type}", rope_inv_freq(config, layer_type), persistent=False)

    def forward(self, input_ids, position_ids, attention_mask, past: list[KV],
                keep: int = 0) -> tuple[torch.Tensor, list[KV]]:
        """`keep` (the head's logits_to_keep) lets a decoder stop computing the other positions once no layer writes
        the cache (Gemma 4's KV-shared layers); here every layer writes it, so every position is computed and the head
        cuts."""
        x = scaled_embedding(self.embed_tokens(input_ids), self.config.hidden_size, self.precision)
        views = layer_views(self, input_ids.shape[1], position_ids, attention_mask, past)
        present = []
        for layer, layer_type, layer_past in zip(self.layers, self.layer_types, past):
            cos, sin, mask, write_at = views[layer_type]
            x, kv = layer(x, cos, sin, mask, layer_past, write_at)
            present.append(kv)
        return self.norm(x), present


def count(keep: int | torch.Tensor, positions) -> int:
    """`keep` as a number: a 0-d tensor (a graph input) read once, so that every cut it makes has one size."""
    if not isinstance(keep, torch.Tensor):
        return keep
    k = keep.item()
    torch._check(k >= 1)
    torch._check(k <= positions)
    return k


def trailing(x: torch.Tensor, keep: int, dim: int = 1) -> torch.Tensor:
    """The last `keep` positions of x along `dim` (all of them for 0)."""
    return x.narrow(dim, x.shape[dim] - keep, keep) if keep else x


class GemmaForCausalLM(nn.Module):
    decoder_class = GemmaModel  # Gemma 4's head is this one over its own decoder

    def __init__(self, config: GemmaConfig, precision: Precision = Precision(), kv_layout: str = "dynamic",
                 ring_size: int | None = None):
        super().__init__()
        self.config = config
        self.model = self.decoder_class(config, precision, kv_layout, ring_size)
        # Tied to the embedding: built on the meta device so that no [vocab, hidden] copy is ever allocated.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids, position_ids, attention_mask, past: list[KV], logits_to_keep: int | torch.Tensor = 0
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits [B, K, V] of the last K = `logits_to_keep` positions (0: all of them, as in transformers), and the
        present KV. `logits_to_keep` may be a 0-d tensor: the graph's num_logits_to_keep input, 1 <= K <= S."""
        keep = count(logits_to_keep, input_ids.shape[1])
        hidden, present = self.model(input_ids, position_ids, attention_mask, past, keep=keep)
        hidden = trailing(hidden, keep)  # [B, K, hidden]: the vocabulary is 256k, skip what nobody reads
        logits = self.lm_head(hidden).float()  # [B, K, V]
        if self.config.final_logit_softcapping is not None:  # Gemma 2
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits, present


class GemmaForSequenceClassification(nn.Module):
    """A linear score over the hidden state of each row's last non-pad token (transformers' pooling)."""

    def __init__(self, config: GemmaConfig, precision: Precision = Precision(), kv_layout: str = "dynamic",
                 ring_size: int | None = None):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, precision, kv_layout, ring_size)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids, position_ids, attention_mask, past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        hidden, present = self.model(input_ids, position_ids, attention_mask, past)
        logits = self.score(hidden)  # [B, S, num_labels]
        non_pad = (input_ids != self.config.pad_token_id).to(torch.int64)
        last = (torch.arange(input_ids.shape[1], device=input_ids.device) * non_pad).argmax(-1)  # [B]
        return logits[torch.arange(input_ids.shape[0], device=input_ids.device), last].float(), present


class GemmaForTokenClassification(nn.Module):
    def __init__(self, config: GemmaConfig, precision: Precision = Precision(), kv_layout: str = "dynamic",
                 ring_size: int | None = None):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, precision, kv_layout, ring_size)
        self.score = nn.Linear(config.hidden_size, config.num_labels)  # with bias, as transformers'

    def forward(self, input_ids, position_ids, attention_mask, past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        hidden, present = self.model(input_ids, position_ids, attention_mask, past)
        return self.score(hidden).float(), present  # [B, S, num_labels]


TASK_CLASSES = {
    "text-generation": GemmaForCausalLM,
    "feature-extraction": GemmaModel,
    "sequence-classification": GemmaForSequenceClassification,
    "token-classification": GemmaForTokenClassification,
}


def decoder_of(model: nn.Module) -> GemmaModel:
    return model.model if hasattr(model, "model") else model  # a head's decoder, or the decoder itself


def empty_past(config: GemmaConfig, batch_size: int, length: int = 0, dtype=torch.float32,
               ring_size: int | None = None) -> list[KV]:
    """Zeroed (key, value) per storing layer (config.kv_layers: every layer before Gemma 4's shared KV)
    [B, Hkv, length, D], each with its layer's heads and head_dim: `ring_size` slots for sliding-window layers."""
    past = []
    for layer in config.kv_layers:
        slots = ring_size if ring_size is not None and config.layer_types[layer] == "sliding_attention" else length
        heads, head_dim = config.kv_shape(layer)
        shape = (batch_size, heads, slots, head_dim)
        past.append((torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)))
    return past


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' generate computes them: count real tokens, pads at 1."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
