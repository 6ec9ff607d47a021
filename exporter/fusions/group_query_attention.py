"""Gemma's attention (models/gemma.py, traced and through onnxscript's fusions) to ONNX Runtime's
GroupQueryAttention: static KV layout only. Two forms, tried in this order:

`group_query_attention_rotary` (float32): the whole block from the projections' outputs, rotary included.
What the trace holds per layer, q and k through onnxscript's RMSNorm and rotary fusions and rotary_positions.py:

    q_in [B,S,H*D] ─Reshape─Transpose─[SimplifiedLayerNormalization: q_norm]─RotaryEmbedding(rows, cos, sin)─┐
    k_in ──────── the same (k_norm) ─► TensorScatter(past_k, ·, write_at) ─► present_k ─Slice(:T)─┐          │
    v_in ─Reshape─Transpose─► TensorScatter(past_v, ·, write_at) ─► present_v ─Slice(:T)─┐        │          │
      masked softmax(q·k * scale [soft-cap], Where(Not(mask), min)) · v ─Reshape─Transpose─Reshape─► out [B,S,H*D]

becomes

    q_in ─[Reshape [B,S,H,D]─SimplifiedLayerNormalization─Reshape [B,S,H*D]]─┐
    k_in ─[the same]────────────────────────────────────────────────────────┼─ GroupQueryAttention(do_rotary 1,
    v_in ───────────────────────────────────────────────────────────────────┘    cos/sin caches, local_window_size,
                                                                                 query_seqlens) ─► out, present_k/v

- No Transpose: the kernel takes [B, S, H*D] and the norms act on each head's last axis, in either layout.
- Rotary inside the kernel: its cos/sin caches hold every position below max_length, computed in the graph from
  inv_freq and constants only, so ONNX Runtime folds them once when the session loads (nothing in the file, nothing
  per step). The kernel rotates token i of a row at position i: the static layout's positions are its slots.
- No mask: the static layout's mask is causal per row over the row's slots, and a sliding layer's window
  (`local_window_size`, which counts as transformers does since ONNX Runtime 1.24); each row's length is
  seqlens_k + 1, as the mask's sum says. The rule reads the window from the mask and checks it against the layer's.
- query_seqlens (each row's new tokens, all of them): with it the kernel takes rows of several tokens each over a
  filled cache in one run (without, batch 1 only).
- A sliding layer with `--sliding-cache window` keeps GroupQueryAttention's windowed cache (sliding_window_cache 1,
  runtime.spec.KVSpec.window_slots): only the rewrite makes that graph right, so every such layer must fuse (the
  driver checks).

`group_query_attention` (the rest, e.g. float16): attention alone, q and k rotated outside, the graph's mask as
attention_bias (left padding and windows exactly transformers'; before ONNX Runtime 1.24 local_window_size counted
one key more, PR #25927), no query_seqlens: prefill of several tokens over a filled cache takes batch 1 only.

Both: seqlens_k is each row's length - 1 (the mask's row sums, minus one), so the kernel writes a row's new entries at
that row's own slots, the ones TensorScatter wrote: rows of different lengths decode together. total_sequence_length
is the mask's width, the longest row. The runtime binds one buffer as past and present and the kernel writes it in
place. Not in the dynamic layout (the kernel allocates, zero-fills and fills a new present every step: slower than the
unfused graph, docs/fusions.md), nor on a ring (token i at slot i mod R; the kernel writes a row's entries at its
length), nor where the CPU kernel cannot run (head_dim not a multiple of 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

_KERNEL_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # GroupQueryAttention's CPU kernel
_TO_HEADS = [0, 2, 1, 3]  # [B, S, H, D] <-> [B, H, S, D]


@dataclass(frozen=True)
class LayerCache:
    """What the exporter's spec says of one layer's cache (by its past key's name): its window (None: a global
    layer) and whether the buffers are GroupQueryAttention's windowed cache."""

    window: int | None = None
    windowed: bool = False


def _scalar(value: ir.Value | None) -> float | None:
    tensor = None if value is None else value.const_value
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _heads(op, x, name: str | None = None):
    """[B, S, H*D] -> [B, H, S, D], as the trace writes it (view, then transpose)."""
    return op.Transpose(op.Reshape(x, pattern.ANY_VALUE), perm=_TO_HEADS, _outputs=[name] if name else 1)


def _attention(op, q, key, value, past_key, past_value, write_at, scale, softcap, mask, fill):
    """The static layout's attention on q [B,H,S,D] and the new key, value [B,Hkv,S,D]: the cache written at
    write_at, its first T slots read, q·k scaled (and soft-capped), masked, softmax, times v, to [B, S, H*D]."""
    present_key = op.TensorScatter(past_key, key, write_at, _outputs=["present_key"])
    present_value = op.TensorScatter(past_value, value, write_at, _outputs=["present_value"])
    first_slots = [pattern.ANY_VALUE] * 4  # starts, ends, axes, steps: slots 0..T-1
    key_read = op.Slice(present_key, *first_slots)  # [B, Hkv, T, D]
    value_read = op.Slice(present_value, *first_slots)
    q_grouped = op.Reshape(q, pattern.ANY_VALUE)  # [B, Hkv, G*S, D]
    scores = pattern.OrValue([
        op.FusedMatMul(q_grouped, key_read, transB=1, _domain="com.microsoft", _outputs=["qk"]),
        op.MatMul(q_grouped, op.Transpose(key_read, perm=[0, 1, 3, 2])),
    ])
    scores = pattern.OrValue([op.Mul(scores, scale), scores])  # Gemma 4 scales by 1.0: no Mul
    capped = op.Mul(op.Tanh(op.Div(scores, softcap)), softcap)  # Gemma 2
    scores = pattern.OrValue([capped, scores])
    scores = op.Reshape(scores, pattern.ANY_VALUE)  # [B, H, S, T]
    masked = op.Where(op.Not(mask), fill, scores)
    probs = pattern.OrValue([
        op.Softmax(masked, axis=-1),
        op.Cast(op.Softmax(op.Cast(masked, to=ir.DataType.FLOAT), axis=-1)),  # float16 graphs
    ])
    out = op.MatMul(op.Reshape(probs, pattern.ANY_VALUE), value_read)  # [B, Hkv, G*S, D]
    out = op.Transpose(op.Reshape(out, pattern.ANY_VALUE), perm=_TO_HEADS)  # [B, S, H, D]
    out = op.Reshape(out, pattern.ANY_VALUE, _outputs=["attention"])  # [B, S, H*D]
    return out, present_key, present_value


def _check_attention(result, caches, q4, past_key, past_value, write_at, mask, fill, present_key, scale, softcap, qk):
    """The checks both forms share; returns (LayerCache, num_heads, kv_heads, head_dim, scale, softcap, the graph's
    attention_mask input) or a failed MatchResult."""
    cache = caches.get(past_key.name)
    if cache is None:
        return result.fail(f"{past_key.name} is no cache the exporter's spec describes", past_key)
    scatter = present_key.producer()
    if scatter.attributes.get_int("axis", -2) not in (2, -2) or scatter.attributes.get_string("mode", "linear") != "linear":
        return result.fail("the cache is not written along its slot axis, linearly", present_key)
    if write_at.producer() is not None and write_at.producer().op_type == "Mod":
        return result.fail("the cache is a ring (its writes wrap around): GroupQueryAttention writes a row's "
                           "entries at its length", write_at)
    for past in (past_key, past_value):
        if not past.is_graph_input():
            return result.fail("the KV cache is not a graph input", past)
    if q4.dtype not in _KERNEL_DTYPES:
        return result.fail(f"GroupQueryAttention's CPU kernel takes float32 or float16, not {q4.dtype}", q4)
    if q4.shape is None or past_key.shape is None or q4.shape.rank() != 4 or past_key.shape.rank() != 4:
        return result.fail("the query or the cache has no known rank-4 shape", [q4, past_key])
    num_heads, kv_heads, head_dim = q4.shape[1], past_key.shape[1], past_key.shape[3]
    if not all(isinstance(d, int) for d in (num_heads, kv_heads, head_dim)):
        return result.fail("the head counts or head_dim are not static", [q4, past_key])
    if num_heads % kv_heads:
        return result.fail(f"{num_heads} query heads do not group over {kv_heads} KV heads", q4)
    if head_dim % 8:
        return result.fail(f"head_dim {head_dim} is not a multiple of 8 (GroupQueryAttention's CPU kernel)", past_key)
    if qk is not None and qk.producer().attributes.get_float("alpha", 1.0) != 1.0:
        return result.fail("FusedMatMul scales its product (alpha); the scale is expected in the Mul", qk)
    scale_value, softcap_value = 1.0 if scale is None else _scalar(scale), 0.0
    if scale_value is None:
        return result.fail("the attention scale is not a constant scalar", scale)
    if softcap is not None:
        softcap_value = _scalar(softcap)
        if not softcap_value:
            return result.fail("the soft-cap is not a constant non-zero scalar", softcap)
    fill_value = _scalar(fill)
    if fill_value is None or fill_value > -1e4:
        return result.fail("the masked scores are not filled with a large negative constant", fill)
    if mask.dtype != ir.DataType.BOOL:
        return result.fail("the mask is not boolean", mask)
    attention_mask = next((v for v in past_key.graph.inputs if v.name == "attention_mask"), None)
    if attention_mask is None:
        return result.fail("the graph has no attention_mask input", past_key)
    return cache, num_heads, kv_heads, head_dim, scale_value, softcap_value, attention_mask


def _lengths(op, attention_mask):
    """seqlens_k [B] (each row's length - 1, int32) and total_sequence_length (the mask's width, an int32 scalar)."""
    lengths = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # [B]
    one = op.Constant(value=ir.tensor(1, dtype=ir.DataType.INT64))
    seqlens_k = op.Cast(op.Sub(lengths, one), to=ir.DataType.INT32)
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=ir.DataType.INT32)
    return seqlens_k, total


def _new_tokens(op, input_ids):
    """query_seqlens [B] (int32): every row's new tokens, the input's length (the same for every layer: one copy)."""
    batch = op.Shape(input_ids, start=0, end=1)
    return op.Cast(op.Expand(op.Shape(input_ids, start=1, end=2), batch), to=ir.DataType.INT32)


def _mask_window(mask: ir.Value, limit: int = 24) -> int | None:
    """The window of a traced static mask (models/gemma.py attention_masks: And(full, Greater(kv, Sub(q, W)))), None
    for a causal one: the constant W of a Greater(·, Sub(·, W)) among the mask's producers."""
    seen, frontier = set(), [mask]
    while frontier and len(seen) < limit:
        value = frontier.pop()
        node = value.producer() if value is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Greater" and node.inputs[1] is not None and node.inputs[1].producer() is not None:
            sub = node.inputs[1].producer()
            if sub.op_type == "Sub" and _scalar(sub.inputs[1]) is not None:
                return int(_scalar(sub.inputs[1]))
        frontier.extend(node.inputs)
    return None


def _derives_from(value: ir.Value, source: ir.Value, limit: int = 24) -> bool:
    """Whether `source` is among the values `value` is computed from (within `limit` nodes)."""
    seen, frontier = set(), [value]
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current is source:
            return True
        node = current.producer() if current is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        frontier.extend(v for v in node.inputs if v is not None)
    return False


class RotaryGroupQueryAttentionFusion(pattern.RewriteRuleClassBase):
    """The attention block from the projections to its output, rotary and q/k norms included (float32)."""

    def __init__(self, caches: dict[str, LayerCache], max_positions: int | None):
        super().__init__("GemmaRotaryGroupQueryAttention", remove_nodes=False)
        self.caches, self.max_positions = caches, max_positions

    def pattern(self, op, q_in, k_in, v_in, q_gamma, k_gamma, position_ids, inv_freq, rows, past_key, past_value,
                write_at, scale, softcap, mask, fill):
        # rotary_positions.py's tables: cos/sin of the positions fed, one row per token
        freqs = op.MatMul(op.Cast(op.Reshape(position_ids, pattern.ANY_VALUE), to=ir.DataType.FLOAT), inv_freq)
        cos, sin = op.Cos(freqs), op.Sin(freqs)
        q = _heads(op, q_in, "q4")
        q = pattern.OrValue([op.SimplifiedLayerNormalization(q, q_gamma, _outputs=["q_norm"]), q])  # Gemma 3
        q = op.RotaryEmbedding(q, rows, cos, sin, _domain="com.microsoft", _outputs=["q_rotary"])
        k = _heads(op, k_in)
        k = pattern.OrValue([op.SimplifiedLayerNormalization(k, k_gamma, _outputs=["k_norm"]), k])
        k = op.RotaryEmbedding(k, rows, cos, sin, _domain="com.microsoft", _outputs=["k_rotary"])
        v = _heads(op, v_in)
        return _attention(op, q, k, v, past_key, past_value, write_at, scale, softcap, mask, fill)

    def check(self, context, q_in, k_in, v_in, q4, position_ids, inv_freq, past_key, past_value, write_at, mask, fill,
              present_key, q_rotary, k_rotary, scale=None, softcap=None, qk=None, q_norm=None, k_norm=None,
              q_gamma=None, k_gamma=None, **_):
        result = pattern.MatchResult()
        checked = _check_attention(result, self.caches, q4, past_key, past_value, write_at, mask, fill, present_key,
                                   scale, softcap, qk)
        if isinstance(checked, pattern.MatchResult):
            return checked
        cache, num_heads, kv_heads, head_dim, self._scale, self._softcap, self._attention_mask = checked
        if q4.dtype != ir.DataType.FLOAT:
            return result.fail(f"the rotary form is for float32 graphs, not {q4.dtype}", q4)
        if self.max_positions is None:
            return result.fail("no static max_length to size the rotary tables", past_key)
        for x, width in ((q_in, num_heads * head_dim), (k_in, kv_heads * head_dim), (v_in, kv_heads * head_dim)):
            if x.shape is None or x.shape.rank() != 3 or x.shape[2] != width:
                return result.fail(f"a projection is not [B, S, {width}]", x)
        if not position_ids.is_graph_input() or position_ids.name != "position_ids":
            return result.fail("the rotary tables are not of the graph's position_ids", position_ids)
        table = inv_freq.const_value
        if table is None or tuple(table.shape) != (1, head_dim // 2):
            return result.fail(f"inv_freq is not a constant [1, {head_dim // 2}] (a rotation of the whole head)",
                               inv_freq)
        for rotary in (q_rotary, k_rotary):
            attributes = rotary.producer().attributes
            if attributes.get_int("interleaved", 0) or attributes.get_int("is_packed_batching", 0):
                return result.fail("the rotation is interleaved or packed: the kernel's is neither", rotary)
            if attributes.get_int("rotary_embedding_dim", 0) not in (0, head_dim):
                return result.fail("the rotation covers part of the head only", rotary)
            if _scalar_attribute(attributes, "scale", 1.0) != 1.0:
                return result.fail("the rotation is scaled", rotary)
        if (q_norm is None) != (k_norm is None):
            return result.fail("q and k are not both normalized", [q_norm, k_norm])
        self._norms = None
        if q_norm is not None:
            norms = []
            for normed, gamma in ((q_norm, q_gamma), (k_norm, k_gamma)):
                node = normed.producer()
                if node.attributes.get_int("axis", -1) != -1 or gamma.const_value is None or gamma.shape is None \
                        or tuple(gamma.shape) != (head_dim,):
                    return result.fail("a q/k norm is not over each head's last axis with a constant scale", normed)
                norms.append((gamma, node.attributes.get_float("epsilon", 1e-5)))
            self._norms = norms
        self._input_ids = next((v for v in past_key.graph.inputs if v.name == "input_ids"), None)
        if self._input_ids is None:
            return result.fail("the graph has no input_ids input", past_key)
        if not _derives_from(mask, self._attention_mask):
            return result.fail("the mask is not computed from attention_mask", mask)
        window = _mask_window(mask)
        if window != cache.window:
            return result.fail(f"the mask's window ({window}) is not the layer's ({cache.window})", mask)
        self._cache, self._heads, self._head_dim = cache, (num_heads, kv_heads), head_dim
        return result

    def rewrite(self, op, q_in, k_in, v_in, inv_freq, past_key, past_value, **_):
        num_heads, kv_heads = self._heads
        query, key = q_in, k_in
        if self._norms is not None:
            query = self._normed(op, q_in, num_heads, *self._norms[0])
            key = self._normed(op, k_in, kv_heads, *self._norms[1])
        seqlens_k, total = _lengths(op, self._attention_mask)
        new_tokens = _new_tokens(op, self._input_ids)
        cos_cache, sin_cache = self._tables(op, inv_freq)
        cache = self._cache
        attributes = dict(num_heads=num_heads, kv_num_heads=kv_heads, scale=self._scale, softcap=self._softcap,
                          local_window_size=cache.window if cache.window else -1, do_rotary=1)
        if cache.windowed:
            attributes["sliding_window_cache"] = 1
        return op.GroupQueryAttention(
            query, key, v_in, past_key, past_value, seqlens_k, total, cos_cache, sin_cache,
            None, None, None, None, None, None, None, new_tokens,  # position_ids .. k_norm_weight unused; query_seqlens
            **attributes, _domain="com.microsoft", _outputs=3,
        )

    def _normed(self, op, x, heads: int, gamma, epsilon: float):
        """RMSNorm of each head of x [B, S, heads*D] over its last axis, back to [B, S, heads*D]."""
        split = op.Reshape(x, op.Constant(value_ints=[0, 0, heads, self._head_dim]))  # [B, S, heads, D]
        normed = op.SimplifiedLayerNormalization(split, gamma, axis=-1, epsilon=epsilon, stash_type=1)
        return op.Reshape(normed, op.Constant(value_ints=[0, 0, heads * self._head_dim]))

    def _tables(self, op, inv_freq):
        """cos and sin [max_length, D/2] of every position, from constants only (folded when the session loads)."""
        positions = op.Range(op.Constant(value_int=0), op.Constant(value_int=self.max_positions),
                             op.Constant(value_int=1))
        positions = op.Unsqueeze(op.Cast(positions, to=ir.DataType.FLOAT), op.Constant(value_ints=[1]))  # [L, 1]
        freqs = op.MatMul(positions, inv_freq)  # [L, D/2]
        return op.Cos(freqs), op.Sin(freqs)


def _scalar_attribute(attributes, name: str, default: float) -> float:
    attribute = attributes.get(name)
    return default if attribute is None else float(attribute.value)


class GroupQueryAttentionFusion(pattern.RewriteRuleClassBase):
    """The attention alone (q and k rotated outside), the graph's mask as attention_bias."""

    def __init__(self, caches: dict[str, LayerCache]):
        super().__init__("GemmaGroupQueryAttention", remove_nodes=False)
        self.caches = caches

    def pattern(self, op, q, key, value, past_key, past_value, write_at, scale, softcap, mask, fill):
        return _attention(op, q, key, value, past_key, past_value, write_at, scale, softcap, mask, fill)

    def check(self, context, q, past_key, past_value, write_at, mask, fill, present_key, scale=None, softcap=None,
              qk=None, **_):
        result = pattern.MatchResult()
        checked = _check_attention(result, self.caches, q, past_key, past_value, write_at, mask, fill, present_key,
                                   scale, softcap, qk)
        if isinstance(checked, pattern.MatchResult):
            return checked
        cache, num_heads, kv_heads, _, self._scale, self._softcap, self._attention_mask = checked
        if cache.windowed:
            return result.fail("a windowed cache needs the rotary form (local_window_size, no mask)", past_key)
        self._heads = (num_heads, kv_heads)
        return result

    def rewrite(self, op, q, key, value, past_key, past_value, mask, fill, **_):
        to_bsd = op.Constant(value_ints=[0, 0, -1])
        key = op.Reshape(op.Transpose(key, perm=_TO_HEADS), to_bsd)  # [B, Hkv, S, D] -> [B, S, Hkv*D]
        value = op.Reshape(op.Transpose(value, perm=_TO_HEADS), to_bsd)
        query = op.Reshape(op.Transpose(q, perm=_TO_HEADS), to_bsd)
        seqlens_k, total = _lengths(op, self._attention_mask)
        zero = op.Constant(value=ir.tensor(np.zeros((), fill.dtype.numpy())))
        bias = op.Where(mask, zero, fill)  # [B, 1, S, T]
        num_heads, kv_heads = self._heads
        return op.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total, None, None, None, bias,  # no cos/sin/positions
            num_heads=num_heads, kv_num_heads=kv_heads, scale=self._scale, softcap=self._softcap,
            local_window_size=-1, do_rotary=0,
            _domain="com.microsoft", _outputs=3,
        )


def group_query_attention_rules(caches: dict[str, LayerCache], max_positions: int | None):
    """(the rotary form's rules, the other form's): the driver applies and counts them in this order."""
    return (pattern.RewriteRuleSet([RotaryGroupQueryAttentionFusion.rule(caches, max_positions)]),
            pattern.RewriteRuleSet([GroupQueryAttentionFusion.rule(caches)]))
