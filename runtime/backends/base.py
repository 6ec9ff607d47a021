"""What the generation loop needs from an execution backend (ONNX Runtime, or a TensorRT engine).

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

KV layouts (manifest kv.layout):
  dynamic  past [B, Hkv, past, D] -> present [B, Hkv, past + S, D]; the cache grows each step.
  static   buffers of max_length slots; the graph writes the new entries at past..past+S-1 and
           returns the whole buffer. Past and present are two buffers swapped each step, or one
           bound as both when the manifest says `shares_buffers` (an in-place fused attention).

The bookkeeping every backend shares (the cache's length, what reset and trim accept) is here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..manifest import Manifest


class Backend(ABC):
    #: the execution provider in use ("cpu", "cuda", "tensorrt")
    provider: str = "cpu"

    def __init__(self, manifest: Manifest):
        kv = manifest.kv  # None for the heads (feature extraction, classification): no cache
        self.manifest = manifest
        self.kv_layout = kv.layout if kv else "dynamic"  # "dynamic" or "static" (see above)
        #: the most tokens a row's cache holds: the static buffers' slots, else None (the model's context limits it)
        self.max_length: int | None = kv.max_length if kv and kv.layout == "static" else None
        #: the most rows a batch may have (None: as many as memory allows)
        self.max_batch_size: int | None = None
        self.shares_buffers = bool(kv and kv.shares_buffers)
        self.past_names, self.present_names = (kv.past_names, kv.present_names) if kv else ([], [])
        self.logits_all = manifest.graph.logits == "all"
        self.batch_size = 0
        self._past_length = 0
        #: seconds spent inside the engine's run() since the last reset: the loop's overhead is the rest
        self.run_seconds = 0.0

    @property
    def past_length(self) -> int:
        """Cache slots in use (pads included): the next attention mask is [B, past_length + S]."""
        return self._past_length

    def reset(self, batch_size: int, max_length: int) -> None:
        """Forget the cache; prepare for `batch_size` rows that will reach `max_length` tokens in all."""
        if self.max_batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(f"a batch of {batch_size} rows does not fit this engine (built for --max-batch-size "
                             f"{self.max_batch_size}); send fewer prompts at once, or build with a larger limit")
        if self.max_length is not None and max_length > self.max_length:
            raise ValueError(
                f"{max_length} tokens (prompt + max_new_tokens) do not fit the KV cache of {self.max_length}; "
                "shorten the prompt or max_new_tokens, or export with a larger --max-length"
            )
        self.batch_size, self._past_length, self.run_seconds = batch_size, 0, 0.0
        self._reset(batch_size)

    def trim(self, length: int) -> None:
        """Keep the first `length` cache slots (0 <= length <= past_length), forget the rest."""
        if not 0 <= length <= self._past_length:
            raise ValueError(f"cannot trim the cache to {length} slots; it holds {self._past_length}")
        if length < self._past_length:
            self._trim(length)
        self._past_length = length

    def check_logits(self, all_logits: bool) -> None:
        if all_logits and not self.logits_all:
            raise ValueError("all_logits needs an artifact exported with --logits all; this one returns the last "
                             "position only")

    @abstractmethod
    def _reset(self, batch_size: int) -> None:
        """Size the cache for `batch_size` rows (the checks are done)."""

    def _trim(self, length: int) -> None:
        """Drop the slots from `length` on. The static layout needs nothing: slots past the mask are ignored, then
        overwritten."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False) -> np.ndarray:
        """Run the new tokens [B, S] over the cache; the cache then holds them too.
        Returns logits [B, vocab] of the last position, or [B, S, vocab] with `all_logits`."""
