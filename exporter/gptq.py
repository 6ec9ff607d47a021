"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): int4 weights that compensate their own rounding error.

Each Linear's columns (input features) are quantized one at a time; the error of a column is spread over
the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs X on a
calibration text shipped with the project (exporter/data/calibration.txt: about 8,000 tokens sampled from
the packaged model by scripts/make_calibration.py). Layers are processed in order, each on inputs computed
by the already-quantized layers before it, so errors do not compound; each layer runs twice (Hessians, then
its quantized outputs), so the cost grows with the depth, not its square.
The grid is the one MatMulNBits and RTN use: 4 bits, blocks of `block_size` inputs, a scale and an
integer zero point per block, its range chosen by the reference's MSE search (`_grid`), so the result is
written as MatMulNBits as is.

This follows the reference implementation (github.com/IST-DASLab/gptq, gptq.py `fasterquant`), in float32
on the CPU (act-order with static groups available, off by default). Memory: one layer's Hessians at a time
(in_features^2 floats each) and the calibration hidden states ([16, 512, hidden] floats)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .blocks import Blocks, pack_nibbles
from .quantize import quantizable

log = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"


class _Captured(Exception):
    """Raised by the first layer's hook once it has seen its inputs: the rest of the model is not run."""


def calibration_ids(tokenizer_dir: Path | None, vocab_size: int, bos_token_id: int = 2, sequences: int = 16,
                    length: int = 512) -> torch.Tensor:
    """[sequences, length] token ids: the calibration text through the artifact's tokenizer, else random ids.
    Every row starts with <bos>, as every prompt does: Gemma's first position is an attention sink whose
    activations are unlike any other's, and a row cut from the middle of the text would lack it."""
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        ids = tokenizer.encode(CALIBRATION_TEXT.read_text(), add_special_tokens=False).ids
        length = min(length, len(ids) // sequences + 1)
        rows = torch.tensor(ids[: sequences * (length - 1)]).reshape(sequences, length - 1)
        return torch.cat([torch.full((sequences, 1), bos_token_id), rows], dim=1)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (sequences, length), generator=generator)


def gptq_model(model: nn.Module, ids: torch.Tensor, block_size: int, progress: bool = True,
               int8_weights: tuple[str, ...] = ()) -> dict[str, Blocks]:
    """Quantize every decoder Linear of `model` in place (its weights become the dequantized int4 values);
    returns {graph initializer name: Blocks} for exporter.quantize. Linears named in `int8_weights` are left
    to the graph quantizer's 8-bit round-to-nearest.

    The reference's sequential scheme: the first layer's inputs are captured once; each layer then runs twice
    on its inputs, to gather its Hessians and, once quantized, to compute the next layer's inputs."""
    from tqdm import tqdm

    from models.gemma import decoder_of, empty_past

    decoder = decoder_of(model)
    names = {module: name for name, module in model.named_modules()}
    arguments = {}  # per layer: its inputs after x (rotary tables, mask, past, slots), as the model passes them

    def capture(index):
        def hook(module, args):
            arguments[index] = args
            if index == len(decoder.layers) - 1:
                raise _Captured
        return hook

    hooks = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(decoder.layers)]
    # Every layer must see its own arguments (sliding or global masks and rotary tables), so the first pass
    # runs the whole stack once; the hidden states it computes on the way are not used.
    if decoder.ring_size is not None:  # a ring takes at most one chunk a run (W + C slots, C new tokens)
        ids = ids[:, : decoder.ring_size - model.config.sliding_window]
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    slots = ids.shape[1] if decoder.kv_layout == "static" else 0  # a static model writes into buffers of its own
    past = empty_past(model.config, ids.shape[0], slots, dtype=decoder.precision.dtype, ring_size=decoder.ring_size)
    try:
        with torch.no_grad():
            model(ids, positions, mask, past)
    except _Captured:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    x = arguments[0][0]
    results = {}
    for index, layer in enumerate(tqdm(decoder.layers, desc="gptq", unit="layer", disable=not progress, leave=False)):
        rest = arguments[index][1:]
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear) and quantizable(m.weight.shape)
                   and not any(part in names[m] for part in int8_weights)]
        hessians = {m: torch.zeros(m.in_features, m.in_features) for m in linears}
        counts = {m: 0 for m in linears}

        def accumulate(module, args):
            x = args[0].reshape(-1, module.in_features).float()  # [tokens, in]
            n = x.shape[0]
            hessians[module] *= counts[module] / (counts[module] + n)
            counts[module] += n
            x = x * (2 / counts[module]) ** 0.5
            hessians[module] += x.T @ x

        hooks = [m.register_forward_pre_hook(accumulate) for m in linears]
        try:
            with torch.no_grad():
                layer(x, *rest)
        finally:
            for hook in hooks:
                hook.remove()
        for module in linears:
            blocks = gptq_weight(module.weight.detach().float(), hessians.pop(module), block_size)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(blocks.dequantize().T))
            results[f"model.{names[module]}.weight"] = blocks
        with torch.no_grad():
            x = layer(x, *rest)[0]  # the next layer's inputs, through the quantized weights
    return results


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, block_size: int, damp: float = 0.01,
                columns_per_pass: int = 128, act_order: bool = False) -> Blocks:
    """GPTQ of one weight [out, in] (nn.Linear's layout) with its input Hessian [in, in].

    Each block's grid is set when its first column comes up, from the weights as updated so far (the
    reference's default). act_order (largest Hessian diagonal first, its `--act-order`) needs the grids fixed
    beforehand from the original weights (its `--static-groups`) to keep blocks contiguous in the input
    dimension as MatMulNBits needs; it is off: on the real Gemma 3 270M it cost perplexity (docs/precision.md)."""
    W = weight.clone()
    out_features, in_features = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0  # inputs that never fired: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0
    k_blocks = -(-in_features // block_size)
    scales = torch.zeros(out_features, k_blocks)
    zeros = torch.zeros(out_features, k_blocks)
    if act_order:  # static groups: every block's grid from the original weights
        for b in range(k_blocks):
            scales[:, b], zeros[:, b] = _grid(W[:, b * block_size : (b + 1) * block_size])
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_features)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    q = torch.zeros(out_features, in_features, dtype=torch.uint8)
    for i1 in range(0, in_features, columns_per_pass):
        i2 = min(i1 + columns_per_pass, in_features)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            block = int(order[i1 + i]) // block_size
            if not act_order and (i1 + i) % block_size == 0:  # a new block: its grid from the updated weights
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :block_size]
                scales[:, block], zeros[:, block] = _grid(group)
            scale, zero = scales[:, block], zeros[:, block]
            w = W1[:, i]
            qi = torch.clamp(torch.round(w / scale) + zero, 0, 15)
            q[:, i1 + i] = qi.to(torch.uint8)
            error = (w - (qi - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] @ Hinv1[i, i:][None, :]
            errors[:, i] = error
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    q_in_order = torch.zeros(out_features, k_blocks * block_size, dtype=torch.uint8)
    q_in_order[:, order] = q
    return _blocks(q_in_order.numpy(), scales.numpy(), zeros.numpy().astype(np.uint8), block_size, in_features)


def _grid(group: torch.Tensor, steps: int = 24, step: float = 0.025,
          norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row: ONNX Runtime's asymmetric grid (min/max including 0), its range
    shrunk by the factor among 1, 0.975, ... that minimizes the row's sum |w - dequantized|^2.4.

    The reference's `Quantizer.find_params(mse=True)` (gptq/quant.py; its grid 100 and shrink to 0.2 in
    steps of 0.01). Clipping the few largest weights refines the grid of all the others (docs/precision.md has
    what it gained on the real model)."""
    low0 = torch.clamp(group.min(dim=1).values, max=0)
    high0 = torch.clamp(group.max(dim=1).values, min=0)
    best = torch.full((group.shape[0],), float("inf"))
    best_scale, best_zero = torch.ones_like(best), torch.zeros_like(best)
    for i in range(steps):
        low, high = low0 * (1 - i * step), high0 * (1 - i * step)
        scale = (high - low) / 15
        scale[scale == 0] = 1
        zero = torch.clamp(torch.round(-low / scale), 0, 15)
        q = torch.clamp(torch.round(group / scale[:, None]) + zero[:, None], 0, 15)
        error = ((q - zero[:, None]) * scale[:, None] - group).abs().pow(norm).sum(1)
        better = error < best
        best[better], best_scale[better], best_zero[better] = error[better], scale[better], zero[better]
    return best_scale, best_zero


def _blocks(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int, K: int) -> Blocks:
    N, k_blocks = scales.shape
    packed = pack_nibbles(q).reshape(N, k_blocks, block_size // 2)
    if k_blocks % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)))
    return Blocks(packed, scales.astype(np.float32), pack_nibbles(zeros), 4, block_size, K)
