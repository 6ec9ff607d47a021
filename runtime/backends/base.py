"""What the generation loop needs from an execution backend (ONNX Runtime, or a TensorRT engine).

A backend owns its session and the KV cache; the loop never sees the cache. For one batch:

    backend.reset(batch_size, max_length)                      forget the cache, size the buffers
    logits = backend.forward(ids, mask, positions)             the new tokens [B, S] over what the cache holds
    logits = backend.forward(ids, mask, positions, rows=...)   static layout: rows [start, start + n) only

`forward` feeds the graph the cache as past, keeps its present as the next past (without a copy where the
execution provider allows), and returns the last position's logits [n, vocab] float32, or every position's
[n, S, vocab] with `all_logits=True` (the graph must be exported with `logits: all`).

KV layouts (manifest kv.layout):
  dynamic  past [B, Hkv, past, D] -> present [B, Hkv, past + S, D]: the cache grows each step, and the rows of a
           batch share its slots. Shorter prompts are left-padded; the mask [B, past + S] marks real tokens
           (1) and pads (0).
  static   one buffer of max_length slots per row, written in place (past and present bound to the same
           memory). Every row has its own length: its tokens sit at slots 0..n-1, the mask [n, T] has n ones
           for it (T: the longest row after this step), and its S new tokens go to slots n-S..n-1. A step may
           run any contiguous range of rows: one row's prefill while the others wait, or the decode of all
           of them (continuous batching: runtime/serving/). Sliding-window layers may keep a ring of fewer
           slots (manifest kv.slots): a run then feeds a row at most `chunk_limit(length)` tokens.

The bookkeeping every backend shares is here: the dynamic past's length, and what reset and trim accept. What
each static row holds, and which rows run together, is runtime/kv.py's: no other module writes cache state.
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
        #: the most new tokens one forward takes (None: any): a longer prefill is fed in chunks (runtime/generate.py)
        self.max_chunk: int | None = None
        #: whether several rows may feed more than one token each over a non-empty cache in one run (ONNX Runtime's
        #: GroupQueryAttention takes one row then, unless it is given each row's new tokens: the fusion
        #: `group_query_attention` does not, `group_query_attention_rotary` does)
        self.rows_prefill_over_cache = "group_query_attention" not in manifest.fusions
        self.past_names, self.present_names = (kv.past_names, kv.present_names) if kv else ([], [])
        self.logits_all = manifest.graph.logits == "all"
        #: the graph takes num_logits_to_keep: it computes the logits of as many trailing positions as asked
        self.keeps_logits = manifest.graph.keeps_logits
        self.batch_size = 0
        #: dynamic layout: the slots of the past, which every row shares (pads included). The static layout's rows
        #: each hold their own count, which runtime/kv.py keeps: the backend reads them from the mask
        self.past_length = 0
        #: seconds spent inside the engine's run() since the last reset: the loop's overhead is the rest
        self.run_seconds = 0.0

    @property
    def static(self) -> bool:
        return self.kv_layout == "static"

    def chunk_limit(self, lengths) -> int | None:
        """The most new tokens one forward may feed rows holding `lengths` tokens (an int or an array; None: any):
        the engine's max_chunk, and a ring's limit (runtime.spec.KVSpec.chunk_limit)."""
        limits = [self.max_chunk]
        if self.manifest.kv is not None:
            limits += [self.manifest.kv.chunk_limit(int(n)) for n in np.atleast_1d(lengths)]
        limits = [n for n in limits if n is not None]
        return min(limits) if limits else None

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
        self.batch_size, self.run_seconds, self.past_length = batch_size, 0.0, 0
        self._reset(batch_size)

    def trim(self, length: int) -> None:
        """Dynamic layout: keep the first `length` slots of the past (one copy), forget the rest. The static layout's
        rows need nothing: slots past a row's length are masked, then overwritten (runtime/kv.py)."""
        if not 0 <= length <= self.past_length:
            raise ValueError(f"cannot trim the cache to {length} slots; it holds {self.past_length}")
        if not self.static and length < self.past_length:
            self._trim(length)
        self.past_length = length

    @property
    def can_copy_rows(self) -> bool:
        """Whether copy_rows works here (static layout, a device this backend can copy on)."""
        return False

    def copy_rows(self, source: int, target: int, length: int) -> None:
        """Static layout: give row `target` the keys and values of the first `length` tokens of row `source`: the
        first `length` slots of each global layer and the whole ring of each sliding-window layer."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy rows of its cache")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False, rows: slice | None = None, keep: int = 1) -> np.ndarray:
        """Run the new tokens [n, S] over the cache; the cache then holds them too. Returns logits [n, vocab] of
        the last position, [n, keep, vocab] of the last `keep` (speculative decoding's verification), or
        [n, S, vocab] with `all_logits`. A graph with a `num_logits_to_keep` input computes just those; one exported
        with --logits all computes every position, and the rest are dropped here."""
        if (all_logits or keep > 1) and not (self.logits_all or self.keeps_logits):
            raise ValueError("logits for more than the last position need an artifact exported with --logits all, "
                             "or a newer export (num_logits_to_keep); this one returns the last position only")
        rows = rows or slice(0, input_ids.shape[0])
        if rows.stop - rows.start != input_ids.shape[0] or rows.stop > self.batch_size:
            raise ValueError(f"rows {rows.start}..{rows.stop - 1} do not match a batch of {input_ids.shape[0]} of "
                             f"the {self.batch_size} the cache holds")
        if not self.static and (rows.start, rows.stop) != (0, self.batch_size):
            raise ValueError("the dynamic KV layout runs the whole batch at once; export with --kv-cache static "
                             "for rows of their own")
        keep = input_ids.shape[1] if all_logits else keep
        logits = self._run(input_ids, attention_mask, position_ids, rows, keep)  # [n, keep or more, V]
        if not self.static:
            self.past_length = attention_mask.shape[1]
        return logits[:, -1] if keep == 1 and not all_logits else logits[:, -keep:]

    @abstractmethod
    def _reset(self, batch_size: int) -> None:
        """Size the cache for `batch_size` rows (the checks are done)."""

    def _trim(self, length: int) -> None:
        """Dynamic layout: drop the past's slots from `length` on."""

    @abstractmethod
    def _run(self, input_ids, attention_mask, position_ids, rows: slice, keep: int) -> np.ndarray:
        """One run of the graph over `rows` of the cache: logits [n, m, V] of at least the last `keep` positions (a
        copy the caller keeps)."""
