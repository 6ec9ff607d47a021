"""Weight blocks in MatMulNBits' layout, and the quantizers that make them.

One weight [K, N] is quantized along K (the input dimension) in blocks of `block_size`: a scale and a zero point
per block and output, 4 or 8 bits a value. The quantizers are ONNX Runtime's: round-to-nearest is its C++ kernel
(the one `MatMulNBitsQuantizer` calls), HQQ its `HQQWeightOnlyQuantizer.quantize_internal` (half-quadratic
optimisation of scale and float zero point, no calibration data); GPTQ (exporter/gptq.py) writes the same blocks.
The graph pass that puts them in the graph is exporter/quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Blocks:
    """One weight [K, N] quantized along K in blocks, in MatMulNBits' layout."""

    packed: np.ndarray  # uint8 [N, K_blocks, block_size * bits / 8]
    scales: np.ndarray  # float [N, K_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(K_blocks * bits / 8)] packed, float [N, K_blocks] (HQQ), None
    bits: int
    block_size: int
    K: int

    def dequantize(self) -> np.ndarray:
        """The float32 weight [K, N] this encodes."""
        N, k_blocks, _ = self.packed.shape
        if self.bits == 4:
            q = unpack_nibbles(self.packed).reshape(N, k_blocks, self.block_size)
        else:
            q = self.packed.reshape(N, k_blocks, self.block_size)
        zero = self._zero_points_unpacked(N, k_blocks)
        w = (q.astype(np.float32) - zero[..., None]) * self.scales.astype(np.float32)[..., None]
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
