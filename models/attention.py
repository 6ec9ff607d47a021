"""The attention core every family's Attention module calls once its q, k and v are projected, normed and rotated:
the KV write (appended in the dynamic layout, written in place at each row's slots in the static one), grouped
q·k with an optional scale and soft-cap, the mask, the softmax in float32 and probs·v."""

from __future__ import annotations

import torch

KV = tuple[torch.Tensor, torch.Tensor]
TENSOR_SCATTER_OPSET = 24


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, past: KV | None,
              write_at: torch.Tensor | None, scale: float | None = None,
              softcap: float | None = None) -> tuple[torch.Tensor, KV | None, KV]:
    """q [B, H, S, D] in the scores' dtype over k, v [B, Hkv, S, D] in the cache's, mask [B or 1, 1, S, T].

    `past` (dynamic: [B, Hkv, P, D]; static: the layer's [B, Hkv, L or R, D] buffer, `write_at` [B] each row's
    first new slot) takes the new k and v; `past=None`: k and v are the keys and values to attend to as they are
    (a Gemma 4 KV-shared layer's, its source layer's). `scale` None: q·k unscaled (no Mul traced).
    Returns the output [B, S, H*D], the present (None without past) and the keys and values attended to."""
    B, H, S, D = q.shape
    present = None
    if past is not None:
        past_k, past_v = past
        if write_at is None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)  # [B, Hkv, T, D]
            present = (k, v)
        else:  # each row's new entries at its own slots; attention reads the slots in use
            present = (write_kv(past_k, k, write_at), write_kv(past_v, v, write_at))  # [B, Hkv, L or R, D]
            k, v = present[0][:, :, : mask.shape[-1]], present[1][:, :, : mask.shape[-1]]  # [B, Hkv, T, D]; a ring's R

    num_kv_heads = k.shape[1]
    groups = H // num_kv_heads
    qg = q.reshape(B, num_kv_heads, groups * S, D)  # [B, Hkv, G*S, D]: heads share their kv
    scores = torch.matmul(qg, k.transpose(2, 3).to(qg.dtype))  # [B, Hkv, G*S, T]
    if scale is not None:
        scores = scores * scale
    if softcap is not None:  # Gemma 2
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, H, S, -1)  # [B, H, S, T]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(B, num_kv_heads, groups * S, -1), v)  # [B, Hkv, G*S, D]
    return out.view(B, H, S, D).transpose(1, 2).reshape(B, S, -1), present, (k, v)  # [B, S, H*D]


def write_kv(cache: torch.Tensor, new: torch.Tensor, write_at: torch.Tensor) -> torch.Tensor:
    """cache [B, H, L, D] with new [B, H, S, D] written at slots write_at[b]..write_at[b]+S-1 of each row b.

    Traced as ONNX's TensorScatter (opset 24), which ONNX Runtime runs in place when past and present are bound
    to one buffer, and TensorRT imports as its KV cache update (addKVCacheUpdate, 10.15+)."""
    if torch.onnx.is_in_onnx_export():
        # axis -2 (the slots of [B, H, L, D]) spelled as TensorRT's importer asks, mode linear as it takes
        return torch.onnx.ops.symbolic("TensorScatter", (cache, new, write_at), {"axis": -2, "mode": "linear"},
                                       dtype=cache.dtype, shape=cache.shape, version=TENSOR_SCATTER_OPSET)
    B, H, S, D = new.shape
    slots = write_at[:, None] + torch.arange(S, device=new.device)  # [B, S]
    return cache.scatter(2, slots[:, None, :, None].expand(B, H, S, D), new)
