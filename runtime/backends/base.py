"""What the generation loop needs from an execution backend.

A backend owns its session and the KV cache. The loop calls `reset(batch_size, max_length)` before a
new batch, then `forward` once for the prefill and once per decode step; the backend feeds its own
present tensors back as the next past (without copies where the execution provider allows), so the
loop never sees the cache. `past_length` is the number of cache slots in use (pads included).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    #: "dynamic" (the cache grows each step) or "static" (buffers of max_length)
    kv_layout: str = "dynamic"
    #: longest sequence (prompt + new tokens) a batch may reach; None if only the model's context limits it
    max_length: int | None = None

    @abstractmethod
    def reset(self, batch_size: int, max_length: int) -> None:
        """Forget the cache and prepare buffers for a batch that will reach `max_length` tokens."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one step; returns logits [batch, S or 1, vocab] float32 and keeps the present as the next past.
        `attention_mask` covers the cache plus the new tokens: [batch, past_length + S]."""

    @property
    @abstractmethod
    def past_length(self) -> int:
        """Cache slots in use."""

    #: seconds spent inside the execution provider's run() since the last reset (for overhead figures)
    run_seconds: float = 0.0
