"""The KV cache's rows and what each holds: the one writer of a backend's cache state.

    cache = KVCache(backend, rows=8)             sizes the backend's buffers; every row empty
    logits = cache.feed(rows, ids)               static layout: each row's new tokens after what it holds
    row, n = cache.best_prefix(ids, rows)        the row holding the longest reusable prefix of `ids`
    cache.keep(row, n); cache.copy(src, dst, n)  reuse a prefix in place, or copy it into another row

A row keeps its tokens after its request ends: that is the prefix cache. The scheduler (runtime/serving), the
offline loop (runtime/generate.py) and a chat session all go through this class, so the lengths, the tokens
each row holds and the backend's capabilities live here and nowhere else.

Static layout: row r's token i sits at slot i of a global layer's buffer and at slot i mod R of a sliding-window
layer's ring (R = window + chunk, runtime.spec.KVSpec); on GroupQueryAttention's windowed cache a row's latest
`resident(n)` tokens sit from slot 0, and a shorter prefix is whole while no compaction came between (an idle row
whose dummy token compacts loses what it held). A ring slot holds the latest token written there, and
`ring_held[r]` records which position that is (-1: none, or garbage). A prefix of n tokens is reusable when the
first query after it, at position n, finds every key its window reaches (positions n - W + 1 .. n - 1) in the
ring under the position the mask assumes: `ring_held[r][p % R] == p` for each. Later queries need no more: a
slot still holding an older sequence's token is either rewritten before a query can see it, or the check above
would have failed (docs/serving.md, "The ring and the prefix cache").

Dynamic layout: the rows share one length (left padding), the backend keeps the past; only row 0 of a
single-row cache is reused (a chat's earlier turns), and cutting it back copies the past once.
"""

from __future__ import annotations

import time

import numpy as np


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate computes them: cumsum(mask) - 1, pads at 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


class KVCache:
    def __init__(self, backend, rows: int, max_length: int | None = None):
        """Size `backend`'s cache for `rows` rows (a static artifact's buffers hold max_length tokens a row; a
        dynamic one's grow up to `max_length`, or the model's context) and forget what it held."""
        self.backend = backend
        kv = backend.manifest.kv
        self.static = backend.static
        self.max_length = backend.max_length  # a static row's slots (None: the dynamic past grows)
        backend.reset(rows, max_length or self.max_length or backend.manifest.context_length)
        self.rows = rows
        self.window = kv.sliding_window if kv is not None else None
        self.ring_size = kv.ring_size if kv is not None else None
        # GroupQueryAttention's windowed cache (--sliding-cache window): a row's layout follows from its length alone
        self.resident = kv.resident if kv is not None and kv.window_layers else None
        self.lengths = np.zeros(rows, np.int64)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.ring_held = np.full((rows, self.ring_size or 0), -1, np.int64)
        self.used_at = np.zeros(rows)  # when each row was last fed (least recently used first)

    # -- what the backend can do ---------------------------------------------------------------------------

    def chunk_limit(self, length: int) -> int | None:
        """The most new tokens one run may feed a row holding `length` tokens (None: any): the engine's most, and a
        ring's (a chunk overwrites nothing its own queries see, and never wraps: runtime.spec.KVSpec)."""
        return self.backend.chunk_limit(length)

    def rollback_room(self, length: int, most: int = 64) -> int:
        """How many of at most `most` tokens a run may feed a row holding `length` and still roll back (speculative
        decoding's drafts): all of them, except on a windowed cache, where a compaction within the run moves what the
        row held."""
        if self.resident:
            for fed in range(1, most + 1):
                if self.resident(length + fed) != self.resident(length) + fed:
                    return fed - 1
        return most

    @property
    def rows_over_cache(self) -> bool:
        """Whether several rows may each feed several tokens over a non-empty cache in one run (ONNX Runtime's
        GroupQueryAttention CPU kernel takes one such row at a time)."""
        return self.backend.rows_prefill_over_cache

    @property
    def can_copy(self) -> bool:
        return self.static and self.backend.can_copy_rows

    # -- feeding tokens ----------------------------------------------------------------------------------

    def feed(self, rows: slice, ids: np.ndarray, all_logits: bool = False, active: np.ndarray | None = None,
             mask: np.ndarray | None = None, keep: int = 1) -> np.ndarray:
        """Run `ids` [n, S] through rows [start, stop), each after what it holds; the rows then hold them too.
        Logits [n, V] of each row's last token ([n, keep, V] of its last `keep`, [n, S, V] with all_logits).

        Static layout: `active` [n] (default all) says which rows take their tokens; an inactive row in the range
        (a free row between busy ones: runs cover contiguous rows) computes a dummy token into the slot after its
        tokens and keeps them. Dynamic layout: every row, with `mask` [n, past + S] marking left padding."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n, S = ids.shape
        if not self.static:
            mask = np.ones((n, int(self.lengths[0]) + S), np.int64) if mask is None else mask
            logits = self.backend.forward(ids, mask, positions(mask)[:, -S:], all_logits, keep=keep)
            self.lengths[:] = mask.shape[1]
            if n == 1:
                self.tokens[0].extend(ids[0].tolist())
            return logits
        index = np.arange(rows.start, rows.stop)
        active = np.ones(n, bool) if active is None else np.asarray(active, bool)
        start = self.lengths[index].copy()
        lost = []  # idle rows whose windowed cache the dummy run compacts: what they held is gone
        if not active.all():  # an idle row writes at its next slot: within the buffer, its tokens kept
            idle = index[~active]
            start[~active] = np.minimum(start[~active], self.max_length - S)
            for row, at in zip(idle, start[~active]):
                if self.resident and not (self._rolls_back(row, at) and self.resident(at + S) == self.resident(at) + S):
                    lost.append(row)
                del self.tokens[row][at:]
        total = start + S
        mask = (np.arange(int(total.max()))[None] < total[:, None]).astype(np.int64)  # [n, T] left-aligned
        logits = self.backend.forward(ids, mask, start[:, None] + np.arange(S)[None], all_logits, rows=rows, keep=keep)
        now = time.monotonic()
        for i, row in enumerate(index):
            written = np.arange(start[i], total[i])
            if self.ring_size:
                self.ring_held[row, written % self.ring_size] = written if active[i] else -1
            if active[i]:
                self.tokens[row][start[i]:] = ids[i].tolist()
                self.lengths[row] = total[i]
                self.used_at[row] = now
            else:
                self.lengths[row] = len(self.tokens[row])
        for row in lost:
            self.clear(row)
        return logits

    # -- the prefix cache --------------------------------------------------------------------------------

    def reusable(self, row: int, n: int) -> bool:
        """Whether the first `n` tokens `row` holds can be kept for a sequence that goes on after them."""
        if n > len(self.tokens[row]):
            return False
        if not self.static:
            return row == 0 and self.rows == 1
        if n == 0:
            return True
        if self.resident:
            return self._rolls_back(row, n)
        if not self.ring_size:
            return True
        needed = np.arange(max(0, n - self.window + 1), n)
        return bool((self.ring_held[row, needed % self.ring_size] == needed).all())

    def _rolls_back(self, row: int, n: int) -> bool:
        """Windowed cache: whether `row`, holding more tokens, still holds its first `n` as it did after them (no
        compaction since: ONNX Runtime's rollback rule, runtime.spec.KVSpec.resident)."""
        held = len(self.tokens[row])
        return self.resident(n) == self.resident(held) - (held - n)

    def prefix(self, row: int, ids) -> int:
        """The longest prefix of `ids`, short of its last token (whose logits a request needs), that `row` holds
        and can keep."""
        held = self.tokens[row]
        n = min(len(held), len(ids) - 1)
        if n <= 0:
            return 0
        a, b = np.asarray(held[:n]), np.asarray(ids[:n])
        differ = np.flatnonzero(a != b)
        n = int(differ[0]) if len(differ) else n
        return n if self.reusable(row, n) else 0  # a ring that moved on: a shorter prefix needs older keys still

    def best_prefix(self, ids, rows) -> tuple[int | None, int]:
        """(row, n): among `rows`, the one holding the longest reusable prefix of `ids` (the least recently used
        among ties); (None, 0) if none holds any."""
        best, length = None, 0
        for row in sorted(rows, key=lambda r: self.used_at[r]):
            n = self.prefix(row, ids)
            if n > length:
                best, length = row, n
        return best, length

    def keep(self, row: int, n: int) -> None:
        """Keep the first `n` tokens of `row` (reusable: asked before), forget the rest."""
        if not self.reusable(row, n):
            raise ValueError(f"row {row} cannot keep {n} tokens (it holds {len(self.tokens[row])}; a ring may have "
                             "overwritten older ones): ask reusable() first")
        if not self.static:
            self.backend.trim(n)
        del self.tokens[row][n:]
        self.lengths[row] = n

    def copy(self, source: int, target: int, n: int) -> None:
        """Give `target` the first `n` tokens of `source` (reusable), by copying their keys and values."""
        if not self.can_copy:
            raise ValueError("this backend cannot copy rows of its cache")
        if not self.reusable(source, n):
            raise ValueError(f"row {source} cannot give {n} tokens (it holds {len(self.tokens[source])})")
        if source != target:
            self.backend.copy_rows(source, target, n)
            self.tokens[target] = self.tokens[source][:n]
            if self.ring_size:
                self.ring_held[target] = self.ring_held[source]
            self.used_at[target] = time.monotonic()
        self.lengths[target] = n
        del self.tokens[target][n:]

    def rollback(self, row: int, length: int) -> None:
        """Static layout: forget the tokens of `row` past `length` (speculative decoding's rejected drafts). Their
        slots hold what was written for them until the row's next tokens overwrite them; on a ring those slots had
        held positions at least a window older than `length` (a run feeds at most a chunk: chunk_limit), which no
        later query of the row can see, so nothing it still needs is lost (tests/runtime/test_scheduler.py)."""
        if not 0 <= length <= self.lengths[row] or (self.resident and not self._rolls_back(row, length)):
            raise ValueError(f"cannot roll row {row} back to {length} tokens; it holds {int(self.lengths[row])}"
                             + (" and its windowed cache compacted since" if self.resident else ""))
        if self.ring_size:
            gone = np.arange(length, self.lengths[row])
            self.ring_held[row, gone % self.ring_size] = -1  # not the row's tokens: never reused as such
        del self.tokens[row][length:]
        self.lengths[row] = length

    def assume(self, row: int, length: int) -> None:
        """Benchmarks: let `row` count `length` tokens of whatever its slots hold (a decode after a long context,
        without its prefill). Its tokens are unknown: nothing reuses them."""
        self.tokens[row] = [-1] * length
        self.lengths[row] = length
        if self.ring_size:
            self.ring_held[row] = -1

    def clear(self, row: int) -> None:
        """Forget what `row` holds."""
        self.tokens[row] = []
        self.lengths[row] = 0
        if self.ring_size:
            self.ring_held[row] = -1
