"""Weight blocks in MatMulNBits' layout, and the quantizers that make them.

One weight [K, N] is quantized along K (the input dimension) in blocks of `block_size`: a scale and a zero point
per block and output, 4 or 8 bits a value. The quantizers are ONNX Runtime's: round-to-nearest is its C++ kernel
(the one `MatMulNBitsQuantizer` calls), HQQ its `HQQWeightOnlyQuantizer.quantize_internal` (half-quadratic
optimisation of scale and float zero point, no calibration data); GPTQ (exporter/gptq.py) writes the same blocks.
llama.cpp's block formats whose values MatMulNBits holds exactly (Q8_0, Q5_0, Q4_0) are ggml's own rules here
(`ggml_blocks`): on weights that were dequantized from such a block, they give back the very block.
The graph pass that puts them in the graph is exporter/quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Blocks:
    """One weight [K, N] quantized along K in blocks, in MatMulNBits' layout. Scales of dtype float16 are exact in
    float16 (a GGUF's, or rounded there before the values were): the graph stores them so and widens them at load."""

    packed: np.ndarray  # uint8 [N, K_blocks, block_size * bits / 8]
    scales: np.ndarray  # float [N, K_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(K_blocks * bits / 8)] packed, float [N, K_blocks] (HQQ), None
    bits: int
    block_size: int
    K: int
    offsets: np.ndarray | None = None  # float16 [N, K_blocks]: added to each block's values (grid_blocks)

    def dequantize(self) -> np.ndarray:
        """The float32 weight [K, N] this encodes."""
        N, k_blocks, _ = self.packed.shape
        if self.bits == 4:
            q = unpack_nibbles(self.packed).reshape(N, k_blocks, self.block_size)
        else:
            q = self.packed.reshape(N, k_blocks, self.block_size)
        zero = self._zero_points_unpacked(N, k_blocks)
        w = (q.astype(np.float32) - zero[..., None]) * self.scales.astype(np.float32)[..., None]
        if self.offsets is not None:
            w += self.offsets.astype(np.float32)[..., None]
        return np.ascontiguousarray(w.reshape(N, -1)[:, : self.K].T)

    def _zero_points_unpacked(self, N: int, k_blocks: int) -> np.ndarray:
        if self.zero_points is None:
            return np.full((N, k_blocks), 2 ** (self.bits - 1), np.float32)
        if self.zero_points.dtype != np.uint8:
            return self.zero_points.astype(np.float32)  # HQQ's float zero points
        if self.bits == 8:
            return self.zero_points[:, :k_blocks].astype(np.float32)
        unpacked = unpack_nibbles(self.zero_points).reshape(N, -1)
        return unpacked[:, :k_blocks].astype(np.float32)

    def int4_kn(self) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric 4-bit values as signed int8 [K, N] and scales [K_blocks, N]: the QDQ layout."""
        N, k_blocks, _ = self.packed.shape
        q = unpack_nibbles(self.packed).reshape(N, -1)[:, : self.K]
        return np.ascontiguousarray((q.astype(np.int8) - 8).T), np.ascontiguousarray(self.scales.T)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """4-bit values packed two a byte, low nibble first (ONNX Runtime's order), one a uint8: last axis x2."""
    return np.stack([packed & 0xF, packed >> 4], -1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """The inverse of unpack_nibbles: values 0..15 along the last axis (of even length), two a byte."""
    q = q.astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Blocks:
    """Round-to-nearest with ONNX Runtime's C++ kernel (what MatMulNBitsQuantizer's default config runs)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    K, N = weight.shape
    k_blocks = -(-K // block_size)
    per_byte = 8 // bits
    w = np.ascontiguousarray(np.pad(weight.astype(np.float32), ((0, k_blocks * block_size - K), (0, 0))))
    packed = np.zeros((N, k_blocks, block_size // per_byte), np.uint8)
    zero_points = np.zeros((N, -(-k_blocks // per_byte)), np.uint8)
    scales = np.zeros((N, k_blocks), np.float32)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, w, scales, zero_points, block_size, N, K, symmetric)
    return Blocks(packed, scales, None if symmetric else zero_points, bits, block_size, K)


def hqq(weight: np.ndarray, block_size: int) -> Blocks:
    """Half-quadratic quantization (ONNX Runtime's HQQWeightOnlyQuantizer): 4 bits, float zero points."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    K, N = weight.shape
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=4))
    q, scales, zero = quantizer.quantize_internal(torch.from_numpy(weight.astype(np.float32)).T, bits=4,
                                                  group_size=block_size)  # q [N, K_padded] ints
    packed = pack_nibbles(q.numpy()).reshape(N, -1, block_size // 2)
    return Blocks(packed, scales.numpy(), zero.numpy(), 4, block_size, K)


# ggml's blocks of 32 with one fp16 scale that MatMulNBits holds exactly: type -> (levels below 0, levels above 0,
# MatMulNBits bits). Q8_0 is d * q, q in -127..127; Q5_0 and Q4_0 are d * (q - 16) and d * (q - 8) with d taken from
# the block's largest magnitude, sign included (ggml's quantize_row_q5_0_ref / q4_0_ref).
GGML_EXACT = {"Q8_0": (127, 127, 8), "Q5_0": (16, 15, 8), "Q4_0": (8, 7, 4)}
GGML_BLOCK = 32


def ggml_blocks(weight: np.ndarray, ggml_type: str, block_size: int = GGML_BLOCK) -> Blocks:
    """A weight [K, N] in one of llama.cpp's GGML_EXACT formats, computed as ggml computes it (blocks of 32 along K,
    the scale rounded to fp16), in MatMulNBits' layout with its default zero point (2^(bits-1)). On a weight
    dequantized from that format the blocks are the GGUF's own: dequantize() gives the weight back bit for bit.
    Another `block_size` applies the same rule to longer blocks (Q8_0's on 128: the tied table, TABLE_BLOCK)."""
    below, above, bits = GGML_EXACT[ggml_type]
    w = _blocked(weight, block_size)
    if ggml_type == "Q8_0":
        d = np.abs(w).max(-1) / below
    else:  # the value of largest magnitude, with its sign, maps to -below
        at = np.abs(w).argmax(-1)
        d = np.take_along_axis(w, at[..., None], -1)[..., 0] / -below
    d = d.astype(np.float16)
    wide = d.astype(np.float32)
    inverse = np.divide(1.0, wide, out=np.zeros_like(wide), where=wide != 0)
    q = np.clip(np.rint(w * inverse[..., None]), -below, above)
    u = (q + 2 ** (bits - 1)).astype(np.uint8)
    packed = pack_nibbles(u) if bits == 4 else u
    return Blocks(packed, d, None, 8 if bits == 8 else bits, block_size, weight.shape[0])


def int8_blocks(weight: np.ndarray, block_size: int = GGML_BLOCK) -> Blocks:
    """8-bit blocks with a zero point, the scale rounded to fp16 first: a block's range in 255 steps. A GGUF's Q5_K
    tensors (32 levels from a minimum per sub-block, which MatMulNBits' integer zero points hold only to a step) come
    within 1/16 of their own step (a sub-block spans 31 of its steps)."""
    w = _blocked(weight, block_size)
    low, high = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
    exact = (high - low) / 255
    scale = exact.astype(np.float16)
    scale = np.where(scale.astype(np.float32) < exact, np.nextafter(scale, np.float16(np.inf)), scale)  # the range fits
    wide = scale.astype(np.float32)
    inverse = np.divide(1.0, wide, out=np.zeros_like(wide), where=wide != 0)
    zero = np.clip(np.rint(-low * inverse), 0, 255)
    q = np.clip(np.rint(w * inverse[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
    return Blocks(q, scale, zero.astype(np.uint8), 8, block_size, weight.shape[0])


def grid_blocks(weight: np.ndarray, block_size: int = GGML_BLOCK, tolerance: float = 1e-3) -> Blocks:
    """4-bit blocks of a weight whose blocks each lie on a grid of at most 16 evenly spaced values that need not hold
    0: a GGUF's Q4_K (a scale and a minimum per sub-block of 32: s * q - m), Q4_1. MatMulNBits' integer zero point
    puts 0 on its grid, so each block keeps the rest as a float offset (`Blocks.offsets`, added by a second product
    in the graph: exporter/quantize.py). The scale is the block's step (the fewest steps from its least value that
    reach every value within `tolerance` of a step), rounded to float16, and the offset the mean remainder, in
    float16: a value comes back within about 1/500 of its step. A block on no such grid is rounded to 15 steps."""
    w = _blocked(weight, block_size)
    low, span = w.min(-1), w.max(-1) - w.min(-1)
    steps = np.full(low.shape, 15)
    found = span == 0
    for count in range(1, 16):
        position = (w - low[..., None]) / np.where(found, 1, span / count)[..., None]
        fits = ~found & (np.abs(position - np.rint(position)).max(-1) < tolerance)
        steps[fits] = count
        found |= fits
    scale = (span / steps).astype(np.float16)
    wide = scale.astype(np.float32)
    inverse = np.divide(1.0, wide, out=np.zeros_like(wide), where=wide != 0)
    q = np.clip(np.rint((w - low[..., None]) * inverse[..., None]), 0, 15)
    zero = np.clip(np.rint(-low * inverse), 0, 15)
    offsets = (w - wide[..., None] * (q - zero[..., None])).mean(-1).astype(np.float16)
    return Blocks(pack_nibbles(q), scale, pack_nibbles(_even(zero)), 4, block_size, weight.shape[0], offsets)


def _even(zero: np.ndarray) -> np.ndarray:
    """Per-block zero points [N, K_blocks] padded to an even count, to pack two a byte."""
    return np.pad(zero, ((0, 0), (0, zero.shape[1] % 2)))


def _blocked(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> float32 [N, K_blocks, block_size], a last partial block padded with zeros (as rtn does)."""
    K, N = weight.shape
    k_blocks = -(-K // block_size)
    w = np.pad(weight.astype(np.float32).T, ((0, 0), (0, k_blocks * block_size - K)))
    return w.reshape(N, k_blocks, block_size)
