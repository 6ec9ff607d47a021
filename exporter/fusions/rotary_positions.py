"""RotaryEmbedding's cos/sin for the positions fed, not for every position up to the largest.

onnxscript's cos/sin-cache fusion, given no constant bound on the positions, builds the tables in the
graph for positions 0..max(position_ids): at a 2,048-token context every decode step computes 2,049 rows
of cos and sin per rotary type to use one. This rule computes the rows of the positions in this step,
[B*S, D/2], and hands RotaryEmbedding the row index of each token in them:

    position_ids ─ReduceMax─Add 1─Range─Reshape─Cast─MatMul(inv_freq)─Cos/Sin ─┐
    x, position_ids ───────────────────────────────────────────────── RotaryEmbedding ─► y
becomes
    position_ids ─Reshape [B*S, 1]─Cast─MatMul(inv_freq)─Cos/Sin ─┐
    x, Reshape(Range(B*S), [B, S]) ───────────────── RotaryEmbedding ─► y

Each RotaryEmbedding gets its own copy of the small computation; ONNX Runtime's common-subexpression
elimination folds the copies of one rotary type back into one.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class RotaryPositionsFusion(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("RotaryPositions", remove_nodes=False)  # the tables feed every layer's rotary

    def pattern(self, op, x, position_ids, inv_freq, start, step):
        end = op.Add(op.ReduceMax(position_ids, keepdims=0), pattern.ANY_VALUE)
        positions = op.Cast(op.Reshape(op.Range(start, end, step), pattern.ANY_VALUE), to=ir.DataType.FLOAT)
        freqs = op.MatMul(positions, inv_freq)  # [max + 1, D/2]
        return op.RotaryEmbedding(x, position_ids, op.Cos(freqs), op.Sin(freqs), _domain="com.microsoft",
                                  _outputs=["rotated"])

    def check(self, context, position_ids, inv_freq, start, step, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not position_ids.is_graph_input():
            return result.fail("the positions are not the graph's position_ids input", position_ids)
        if inv_freq.const_value is None or inv_freq.shape is None or inv_freq.shape.rank() != 2:
            return result.fail("inv_freq is not a constant [1, D/2] tensor", inv_freq)
        for value, expected in ((start, 0), (step, 1)):
            tensor = value.const_value
            if tensor is None or tensor.size != 1 or int(tensor.numpy().reshape(())) != expected:
                return result.fail("the table's range does not count from 0 by 1", value)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, rotated, **_):
        flat = op.Reshape(position_ids, op.Constant(value_ints=[-1, 1]))  # [B*S, 1]
        freqs = op.MatMul(op.Cast(flat, to=ir.DataType.FLOAT), inv_freq)  # [B*S, D/2]
        rows = op.Range(op.Constant(value_int=0), op.Size(position_ids), op.Constant(value_int=1))
        rows = op.Reshape(rows, op.Shape(position_ids))  # [B, S]: each token's row in the tables
        attributes = {name: attr.value for name, attr in rotated.producer().attributes.items()}
        return op.RotaryEmbedding(x, rows, op.Cos(freqs), op.Sin(freqs), _domain="com.microsoft", **attributes)


rotary_positions_rules = pattern.RewriteRuleSet([RotaryPositionsFusion.rule()])
