"""What the generation loop needs from an execution backend (ONNX Runtime here; TensorRT next).

A backend owns its session and the KV cache; the loop never sees the cache. For one batch:

    backend.reset(batch_size, max_length)          forget the cache, size the buffers
    logits = backend.forward(ids, mask, positions)   prefill: ids [B, S], mask [B, S]
    logits = backend.forward(tok, mask, positions)   each decode step: tok [B, 1], mask [B, past + 1]
    ...

`forward` feeds the graph the cache as past, keeps its present as the next past (without a copy
where the execution provider allows), and returns the last position's logits [B, vocab] float32.
The attention mask covers the cache and the new tokens, [B, past_length + S] (1 real, 0 pad); the
positions are the new tokens' [B, S]. With `all_logits=True` it returns [B, S, vocab] (the graph
must be exported with `logits: all`): parity tools compare every position.

`trim(length)` keeps the first `length` cache slots and forgets the rest: a chat whose next prompt
shares only a prefix with what the cache holds re-feeds from there.

KV layouts (manifest kv_cache.layout):
  dynamic  past [B, Hkv, past, D] -> present [B, Hkv, past + S, D]; the cache grows each step.
  static   buffers of max_length slots; the graph writes the new entries at past..past+S-1 and
           returns the whole buffer. Past and present are two buffers swapped each step, or one
           bound as both when the manifest says `shares_buffers` (an in-place fused attention).
           `reset` refuses a batch whose max_length does not fit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    #: "dynamic" or "static" (see above)
    kv_layout: str = "dynamic"
    #: static layout: the slots of the cache buffers; None when only the model's context limits a sequence
    max_length: int | None = None
    #: the execution provider in use ("cpu", "cuda", "tensorrt")
    provider: str = "cpu"
    #: seconds spent inside the engine's run() since the last reset: the loop's overhead is the rest
    run_seconds: float = 0.0

    @abstractmethod
    def reset(self, batch_size: int, max_length: int) -> None:
        """Forget the cache; prepare for `batch_size` rows that will reach `max_length` tokens in all."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False) -> np.ndarray:
        """Run the new tokens [B, S] over the cache; the cache then holds them too.
        Returns logits [B, vocab] of the last position, or [B, S, vocab] with `all_logits`."""

    @property
    @abstractmethod
    def past_length(self) -> int:
        """Cache slots in use (pads included): the next attention mask is [B, past_length + S]."""

    @abstractmethod
    def trim(self, length: int) -> None:
        """Keep the first `length` cache slots (0 <= length <= past_length), forget the rest."""
