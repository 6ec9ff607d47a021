"""The projections that read one input, quantized alike, as one MatMulNBits (after quantization), as
onnxruntime-genai's builder packs them.

Attention (GroupQueryAttention's q, k, v, from group_query_attention.py; Gemma 3's q/k norms between):

    x ─MatMulNBits(Wq)─[Reshape─SimplifiedLayerNormalization(gq)─Reshape]─┐
    x ─MatMulNBits(Wk)─[Reshape─SimplifiedLayerNormalization(gk)─Reshape]─┼─ GroupQueryAttention(q, k, v, ...)
    x ─MatMulNBits(Wv)────────────────────────────────────────────────────┘
becomes
    x ─MatMulNBits([Wq|Wk|Wv])─[Split(q+k, v)─Reshape [B,S,H+Hkv,D]─SimplifiedLayerNormalization([gq..gk])─Reshape─
      Concat(·, v)]─ GroupQueryAttention(packed qkv, -, -, ...)

one norm for q's and k's heads (its scale [H+Hkv, D] holds each head's row: ONNX Runtime broadcasts it), and the
kernel's packed-QKV input.

The MLP:

    x ─MatMulNBits(Wgate)─FastGelu─┐                 x ─MatMulNBits([Wgate|Wup])─Split─FastGelu─┐
    x ─MatMulNBits(Wup)────────────┴─ Mul    becomes                               └────────────┴─ Mul

MatMulNBits holds each output column's blocks on their own row of B, scales and zero points, so a packed weight is
the rows of its parts one after the other: the same bytes, one kernel call instead of three (two) in a decode step.
Only weights of the same bits, block size, accuracy level and zero-point form pack (a GGUF's q/k and v may differ).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

_SAME = ("K", "bits", "block_size", "accuracy_level")  # the attributes packed weights share


def _projection(op, x, name: str):
    return op.MatMulNBits(x, _allow_other_inputs=True, _domain="com.microsoft", _outputs=[name])


def _check_packable(result: pattern.MatchResult, outputs: list[ir.Value]) -> pattern.MatchResult:
    """Whether the MatMulNBits producing `outputs` (one input) can be one: same attributes, constant weights of one
    form, no bias."""
    nodes = [v.producer() for v in outputs]
    first = nodes[0]
    form = None
    for node in nodes:
        for name in _SAME:
            if node.attributes.get_int(name, 0) != first.attributes.get_int(name, 0):
                return result.fail(f"the projections differ in {name}", outputs)
        if node.attributes.get_int("weight_prepacked", 0):
            return result.fail("a projection is prepacked for an execution provider", node.outputs[0])
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        if any(v is not None for v in inputs[4:]):
            return result.fail("a projection has g_idx or a bias", node.outputs[0])
        if any(v is not None and _stored(v) is None for v in inputs[1:4]):
            return result.fail("a projection's weights are not constants", node.outputs[0])
        zero_points, scales = inputs[3], _stored(inputs[2])
        node_form = (scales[1], None if zero_points is None else (zero_points.dtype, tuple(zero_points.shape)[1:]))
        if node is first:
            form = node_form
        elif node_form != form:
            return result.fail("the projections' scales or zero points differ in how they are stored", outputs)
    return result


def _stored(value: ir.Value):
    """(the initializer holding `value`, the type a Cast widens it to or None) when `value` is a constant, or a Cast
    of one (scales stored in float16: exporter/quantize.py); None otherwise."""
    if value.const_value is not None:
        return value, None
    node = value.producer()
    if node is not None and node.op_type == "Cast" and node.inputs[0].const_value is not None:
        return node.inputs[0], node.attributes.get_int("to")
    return None


def _packed(op, x, outputs: list[ir.Value]):
    """One MatMulNBits on x whose output is the concatenation of `outputs` (their nodes' weights, rows joined)."""
    nodes = [v.producer() for v in outputs]
    first = nodes[0]
    bits = first.attributes.get_int("bits")
    base = "+".join(n.inputs[1].name.removesuffix(f"_Q{bits}") for n in nodes)
    inputs = [x]
    for index, suffix in ((1, f"_Q{bits}"), (2, "_scales"), (3, "_zero_points")):
        if len(first.inputs) <= index or first.inputs[index] is None:
            break
        parts = [_stored(n.inputs[index]) for n in nodes]
        joined = op.initializer(ir.tensor(np.concatenate([v.const_value.numpy() for v, _ in parts]), name=base + suffix))
        widen = parts[0][1]
        inputs.append(joined if widen is None else op.Cast(joined, to=widen))
    widths = [n.attributes.get_int("N") for n in nodes]
    attributes = {key: first.attributes.get_int(key) for key in _SAME if key in first.attributes}
    return op.MatMulNBits(*inputs, N=sum(widths), **attributes, _domain="com.microsoft"), widths


class PackedAttentionInput(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("PackedAttentionInput")

    def pattern(self, op, x, q_shape, k_shape, q_gamma, k_gamma, q_back, k_back):
        q = _projection(op, x, "q")
        q = pattern.OrValue([
            op.Reshape(op.SimplifiedLayerNormalization(op.Reshape(q, q_shape), q_gamma, _outputs=["q_norm"]), q_back),
            q])
        k = _projection(op, x, "k")
        k = pattern.OrValue([
            op.Reshape(op.SimplifiedLayerNormalization(op.Reshape(k, k_shape), k_gamma, _outputs=["k_norm"]), k_back),
            k])
        v = _projection(op, x, "v")
        return op.GroupQueryAttention(q, k, v, _allow_other_inputs=True, _domain="com.microsoft",
                                      _outputs=["attention", "present_key", "present_value"])

    def check(self, context, x, q, k, v, attention, q_gamma=None, k_gamma=None, q_norm=None, k_norm=None,
              q_shape=None, k_shape=None, **_):
        result = pattern.MatchResult()
        if not _check_packable(result, [q, k, v]):
            return result
        node = attention.producer()
        self._heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
        widths = [value.producer().attributes.get_int("N") for value in (q, k, v)]
        head_dim = widths[0] // self._heads[0]
        if widths != [self._heads[0] * head_dim, self._heads[1] * head_dim, self._heads[1] * head_dim]:
            return result.fail(f"q, k, v of {widths} columns are not {self._heads} heads of one size", [q, k, v])
        self._head_dim, self._norms = head_dim, None
        if (q_norm is None) != (k_norm is None):
            return result.fail("q and k are not both normalized", [q_norm, k_norm])
        if q_norm is not None:
            norms = [n.producer() for n in (q_norm, k_norm)]
            epsilon = {n.attributes.get_float("epsilon", 1e-5) for n in norms}
            gammas = [g.const_value for g in (q_gamma, k_gamma)]
            if len(epsilon) != 1 or any(n.attributes.get_int("axis", -1) != -1 for n in norms):
                return result.fail("the q and k norms differ in epsilon or axis", [q_norm, k_norm])
            if any(g is None or tuple(g.shape) != (head_dim,) for g in gammas):
                return result.fail("a q/k norm's scale is not a constant of head_dim values", [q_gamma, k_gamma])
            for shape, heads in ((q_shape, self._heads[0]), (k_shape, self._heads[1])):
                target = None if shape.const_value is None else shape.const_value.numpy().tolist()
                if target is None or len(target) != 4 or target[2:] != [heads, head_dim]:
                    return result.fail(f"a norm is not over [B, S, {heads}, {head_dim}]", shape)
            self._norms = ((q_gamma, k_gamma), epsilon.pop())
        return result

    def rewrite(self, op, x, q, k, v, attention, **_):
        packed, (q_width, k_width, v_width) = _packed(op, x, [q, k, v])
        if self._norms is not None:
            (q_gamma, k_gamma), epsilon = self._norms
            heads, kv_heads = self._heads
            gamma = np.concatenate([np.tile(q_gamma.const_value.numpy(), (heads, 1)),
                                    np.tile(k_gamma.const_value.numpy(), (kv_heads, 1))])
            gamma_value = op.initializer(ir.tensor(gamma, name=f"{q_gamma.name}+{k_gamma.name}"))  # [H+Hkv, D]
            qk, value = op.Split(packed, op.Constant(value_ints=[q_width + k_width, v_width]), axis=-1, _outputs=2)
            qk = op.Reshape(qk, op.Constant(value_ints=[0, 0, heads + kv_heads, self._head_dim]))
            qk = op.SimplifiedLayerNormalization(qk, gamma_value, axis=-1, epsilon=epsilon, stash_type=1)
            qk = op.Reshape(qk, op.Constant(value_ints=[0, 0, q_width + k_width]))
            packed = op.Concat(qk, value, axis=-1)  # [B, S, (H + 2 Hkv) D]
        node = attention.producer()
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        return op.GroupQueryAttention(packed, None, None, *node.inputs[3:], **attributes, _domain="com.microsoft",
                                      _outputs=3)


class PackedGatedMLP(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("PackedGatedMLP")

    def pattern(self, op, x):
        gate, up = _projection(op, x, "gate"), _projection(op, x, "up")
        return op.Mul(op.FastGelu(gate, _domain="com.microsoft", _outputs=["gelu"]), up)

    def check(self, context, x, gate, up, gelu, **_):
        result = pattern.MatchResult()
        if len(gelu.producer().inputs) > 1:
            return result.fail("FastGelu has a bias", gelu)
        return _check_packable(result, [gate, up])

    def rewrite(self, op, x, gate, up, **_):
        packed, widths = _packed(op, x, [gate, up])
        gate, up = op.Split(packed, op.Constant(value_ints=widths), axis=-1, _outputs=2)
        return op.Mul(op.FastGelu(gate, _domain="com.microsoft"), up)


packed_attention_rules = pattern.RewriteRuleSet([PackedAttentionInput.rule()])
packed_mlp_rules = pattern.RewriteRuleSet([PackedGatedMLP.rule()])
