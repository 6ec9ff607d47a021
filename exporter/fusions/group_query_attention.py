"""Gemma's attention (models/gemma.py, traced and through onnxscript's fusions) to ONNX Runtime's
GroupQueryAttention, with the mask as an additive attention_bias: static KV layout only.

What the trace of the static KV layout holds, per layer (q and k already rotated by RotaryEmbedding):

    past_k ─TensorScatter(k [B,Hkv,S,D], write_at)─► present_k ─Slice(:T)─┐       (each row's own slots)
    q ─Reshape [B,Hkv,G*S,D]─FusedMatMul(·, transB)─Mul(scale)─[Div─Tanh─Mul: softcap]
      ─Reshape [B,H,S,T]─Where(Not(mask), min)─Softmax─Reshape─MatMul(present_v[:T])─Reshape─Transpose─Reshape─► out

becomes

    GroupQueryAttention(q, k, v [B,S,H*D], past_k, past_v, seqlens_k, total_sequence_length,
                        attention_bias = Where(mask, 0, min))  ─► out, present_k, present_v

Choices, and why:
- The mask goes in as attention_bias (ONNX Runtime >= 1.22) and local_window_size stays -1. The bias is
  the graph's own mask: causality per row and Gemma 2/3's sliding window come out exactly as transformers
  computes them, and the window does not depend on ONNX Runtime's version (its local_window_size counted one
  key more before 1.24, PR #25927).
- seqlens_k is each row's length - 1 (the mask's row sums, minus one), so the kernel writes a row's new entries
  at that row's own slots, the ones TensorScatter wrote: rows of different lengths decode together. The
  total_sequence_length is the mask's width, the longest row.
- Rotary stays outside (do_rotary 0): RotaryEmbedding already ran, with the real positions.
- Static layout only: the kernel writes the buffer in place when past and present are one buffer, which the
  runtime binds. In the dynamic layout the kernel allocates, zero-fills and fills a new present every step
  (slower than the unfused graph: docs/fusions.md), so that layout keeps its own attention.
- Prefill of more than one token over a non-empty cache takes batch 1 only (the kernel's limit): the runtime
  prefills a row at a time.
- Not on a ring (a sliding-window layer's cache of window + chunk slots, token i at slot i mod R): the kernel
  writes a row's entries at its length and reads slots 0..length-1, so those layers keep their own attention.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

_KERNEL_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # GroupQueryAttention's CPU kernel


def _scalar(value: ir.Value | None) -> float | None:
    tensor = None if value is None else value.const_value
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


class GroupQueryAttentionFusion(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("GemmaGroupQueryAttention", remove_nodes=False)

    def pattern(self, op, q, key, value, past_key, past_value, write_at, scale, softcap, mask, fill):
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
        out = op.Transpose(op.Reshape(out, pattern.ANY_VALUE), perm=[0, 2, 1, 3])  # [B, S, H, D]
        out = op.Reshape(out, pattern.ANY_VALUE, _outputs=["attention"])  # [B, S, H*D]
        return out, present_key, present_value

    def check(self, context, q, past_key, past_value, write_at, mask, fill, present_key, scale=None, softcap=None,
              qk=None, **_):
        result = pattern.MatchResult()
        scatter = present_key.producer()
        if scatter.attributes.get_int("axis", -2) not in (2, -2) or scatter.attributes.get_string("mode", "linear") != "linear":
            return result.fail("the cache is not written along its slot axis, linearly", present_key)
        if write_at.producer() is not None and write_at.producer().op_type == "Mod":
            return result.fail("the cache is a ring (its writes wrap around): GroupQueryAttention writes a row's "
                               "entries at its length", write_at)
        for past in (past_key, past_value):
            if not past.is_graph_input():
                return result.fail("the KV cache is not a graph input", past)
        if q.dtype not in _KERNEL_DTYPES:
            return result.fail(f"GroupQueryAttention's CPU kernel takes float32 or float16, not {q.dtype}", q)
        if q.shape is None or past_key.shape is None or q.shape.rank() != 4 or past_key.shape.rank() != 4:
            return result.fail("the query or the cache has no known rank-4 shape", [q, past_key])
        num_heads, kv_heads, head_dim = q.shape[1], past_key.shape[1], past_key.shape[3]
        if not all(isinstance(d, int) for d in (num_heads, kv_heads, head_dim)):
            return result.fail("the head counts or head_dim are not static", [q, past_key])
        if num_heads % kv_heads:
            return result.fail(f"{num_heads} query heads do not group over {kv_heads} KV heads", q)
        if head_dim % 8:
            return result.fail(f"head_dim {head_dim} is not a multiple of 8 (GroupQueryAttention's CPU kernel)", past_key)
        if qk is not None and qk.producer().attributes.get_float("alpha", 1.0) != 1.0:
            return result.fail("FusedMatMul scales its product (alpha); the scale is expected in the Mul", qk)
        self._scale, self._softcap = 1.0 if scale is None else _scalar(scale), 0.0
        if self._scale is None:
            return result.fail("the attention scale is not a constant scalar", scale)
        if softcap is not None:
            self._softcap = _scalar(softcap)
            if not self._softcap:
                return result.fail("the soft-cap is not a constant non-zero scalar", softcap)
        fill_value = _scalar(fill)
        if fill_value is None or fill_value > -1e4:
            return result.fail("the masked scores are not filled with a large negative constant", fill)
        if mask.dtype != ir.DataType.BOOL:
            return result.fail("the mask is not boolean", mask)
        self._attention_mask = next((v for v in past_key.graph.inputs if v.name == "attention_mask"), None)
        if self._attention_mask is None:
            return result.fail("the graph has no attention_mask input", past_key)
        self._heads = (num_heads, kv_heads)
        return result

    def rewrite(self, op, q, key, value, past_key, past_value, mask, fill, **_):
        to_bsd = op.Constant(value_ints=[0, 0, -1])
        key = op.Reshape(op.Transpose(key, perm=[0, 2, 1, 3]), to_bsd)  # [B, Hkv, S, D] -> [B, S, Hkv*D]
        value = op.Reshape(op.Transpose(value, perm=[0, 2, 1, 3]), to_bsd)
        query = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), to_bsd)

        attention_mask = self._attention_mask  # [B, T]: each row's slots in use, left-aligned
        lengths = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # [B]
        one = op.Constant(value=ir.tensor(1, dtype=ir.DataType.INT64))
        seqlens_k = op.Cast(op.Sub(lengths, one), to=ir.DataType.INT32)  # [B]: each row's length - 1
        total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=ir.DataType.INT32)  # a scalar
        zero = op.Constant(value=ir.tensor(np.zeros((), fill.dtype.numpy())))
        bias = op.Where(mask, zero, fill)  # [B, 1, S, T]
        num_heads, kv_heads = self._heads
        return op.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total, None, None, None, bias,  # no cos/sin/positions
            num_heads=num_heads, kv_num_heads=kv_heads, scale=self._scale, softcap=self._softcap,
            local_window_size=-1, do_rotary=0,
            _domain="com.microsoft", _outputs=3,
        )


group_query_attention_rules = pattern.RewriteRuleSet([GroupQueryAttentionFusion.rule()])
