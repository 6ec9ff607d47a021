"""Gemma's attention (models/gemma.py, traced and through onnxscript's fusions) to ONNX Runtime's
GroupQueryAttention, with the mask as an additive attention_bias.

What the trace of the static KV layout holds, per layer (q and k already rotated by RotaryEmbedding):

    past_k ─Transpose─ScatterND(slots, k [S,B,Hkv,D])─Transpose─► present_k      (index_copy into the buffer)
    q ─Reshape [B,Hkv,G*S,D]─FusedMatMul(present_k, transB)─Mul(scale)─[Div─Tanh─Mul: softcap]
      ─Reshape [B,H,S,T]─Where(Not(mask), min)─Softmax─Reshape─MatMul(present_v)─Reshape─Transpose─Reshape─► out

becomes

    GroupQueryAttention(q, k, v [B,S,H*D], past_k, past_v, seqlens_k, total_sequence_length,
                        attention_bias = Where(mask, 0, min)[..., :T])  ─► out, present_k, present_v

Choices, and why:
- The mask goes in as attention_bias (ONNX Runtime >= 1.22) and local_window_size stays -1. The bias is
  the graph's own mask: left padding (GroupQueryAttention alone assumes right padding) and Gemma 2/3's
  sliding window come out exactly as transformers computes them, and the window does not depend on
  ONNX Runtime's version (its local_window_size counted one key more before 1.24, PR #25927).
- Every row's seqlens_k is T - 1 (T = attention_mask's length, pads included), so the kernel's causal
  limit and its write position are the cache slots the mask speaks of: slots T-S..T-1.
- Rotary stays outside (do_rotary 0): RotaryEmbedding already ran, with the real positions.
- Static layout only: past is a buffer of max_length slots and the kernel writes the new rows in place;
  the runtime binds one buffer as both past and present (manifest kv_cache.shares_buffers), which is how
  the kernel detects sharing (same pointer). In the dynamic layout the kernel allocates, zero-fills and
  fills a new present every step: measured on the real 270M, decode fell to 0.90x of the unfused graph at
  a 128-token prompt and 0.86x at 2,048 (prefill rose 1.41x), so that layout keeps its own attention.
- Prefill of more than one token over a non-empty cache takes batch 1 only (the kernel's limit): the
  runtime prefills a batch at once and extends a chat cache one conversation at a time.
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

    def _present(self, op, past, new):
        # index_copy into the buffer, traced as ScatterND on the slot axis; new: [S, B, Hkv, D]
        return op.Transpose(op.ScatterND(op.Transpose(past, perm=[2, 0, 1, 3]), pattern.ANY_VALUE, new),
                            perm=[1, 2, 0, 3])

    def pattern(self, op, q, key, value, past_key, past_value, scale, softcap, mask, fill):
        present_key, present_value = self._present(op, past_key, key), self._present(op, past_value, value)
        q_grouped = op.Reshape(q, pattern.ANY_VALUE)  # [B, Hkv, G*S, D]
        scores = pattern.OrValue([
            op.FusedMatMul(q_grouped, present_key, transB=1, _domain="com.microsoft", _outputs=["qk"]),
            op.MatMul(q_grouped, op.Transpose(present_key, perm=[0, 1, 3, 2])),
        ])
        scores = op.Mul(scores, scale)
        capped = op.Mul(op.Tanh(op.Div(scores, softcap)), softcap)  # Gemma 2
        scores = pattern.OrValue([capped, scores])
        scores = op.Reshape(scores, pattern.ANY_VALUE)  # [B, H, S, T]
        masked = op.Where(op.Not(mask), fill, scores)
        probs = pattern.OrValue([
            op.Softmax(masked, axis=-1),
            op.Cast(op.Softmax(op.Cast(masked, to=ir.DataType.FLOAT), axis=-1)),  # float16 graphs
        ])
        out = op.MatMul(op.Reshape(probs, pattern.ANY_VALUE), present_value)  # [B, Hkv, G*S, D]
        out = op.Transpose(op.Reshape(out, pattern.ANY_VALUE), perm=[0, 2, 1, 3])  # [B, S, H, D]
        out = op.Reshape(out, pattern.ANY_VALUE, _outputs=["attention"])  # [B, S, H*D]
        return out, present_key, present_value

    def check(self, context, q, past_key, past_value, scale, mask, fill, softcap=None, qk=None, **_):
        result = pattern.MatchResult()
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
        self._scale, self._softcap = _scalar(scale), 0.0
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
        key = op.Reshape(op.Transpose(key, perm=[1, 0, 2, 3]), to_bsd)  # [S, B, Hkv, D] -> [B, S, Hkv*D]
        value = op.Reshape(op.Transpose(value, perm=[1, 0, 2, 3]), to_bsd)
        query = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), to_bsd)

        attention_mask = self._attention_mask
        total = op.Shape(attention_mask, start=1, end=2)  # [1]: T, the slots in use
        batch = op.Shape(attention_mask, start=0, end=1)  # [1]
        total_i32 = op.Cast(op.Squeeze(total), to=ir.DataType.INT32)  # a scalar, as the kernel takes it
        one = op.Constant(value=ir.tensor(1, dtype=ir.DataType.INT32))
        seqlens_k = op.Expand(op.Sub(total_i32, one), batch)  # [B]: T - 1 on every row, pads included
        zero = op.Constant(value=ir.tensor(np.zeros((), fill.dtype.numpy())))
        bias = op.Where(mask, zero, fill)  # [B, 1, S, kv_len]
        # the mask spans the whole buffer; the kernel wants the T slots in use
        bias = op.Slice(bias, op.Constant(value_ints=[0]), total, op.Constant(value_ints=[3]))
        num_heads, kv_heads = self._heads
        return op.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total_i32, None, None, None, bias,  # no cos/sin/positions
            num_heads=num_heads, kv_num_heads=kv_heads, scale=self._scale, softcap=self._softcap,
            local_window_size=-1, do_rotary=0,
            _domain="com.microsoft", _outputs=3,
        )


group_query_attention_rules = pattern.RewriteRuleSet([GroupQueryAttentionFusion.rule()])
