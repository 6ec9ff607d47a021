"""Gelu(approximate="tanh") (ONNX opset 20, what torch.onnx emits for Gemma's gelu_pytorch_tanh) to ONNX
Runtime's FastGelu, the same function with a fused kernel. onnxscript's own gelu rule matches only the
tanh formula spelled out in Pow/Mul/Tanh nodes."""

from __future__ import annotations

from onnxscript.rewriter import pattern


class TanhGeluToFastGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Gelu(x, approximate="tanh")

    def check(self, op, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype is not None and x.dtype.name not in ("FLOAT", "FLOAT16"):
            return result.fail("FastGelu takes float32 or float16", x)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


fast_gelu_rules = pattern.RewriteRuleSet([TanhGeluToFastGelu.rule()])
