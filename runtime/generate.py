"""The generation loop, as mlx-lm's generate_step: a generator that yields the next token of every row.

    prompt ids ─> prefill ─> logits ─> sample ─> token ─┐
                               ^                          │ yield
                               └──── decode step <────────┘

The backend owns the KV cache. The loop owns the attention mask, the positions and the token history,
in buffers allocated once per batch and filled in place: a decode step slices them and binds them,
without concatenating anything.

    generate_step(backend, ids, mask, sampler, n)   tokens [B] per step
    generate_tokens(...)                            new tokens [B, n]: eos per row, padding, stop callbacks
    stream(...)                                     text pieces of one row, stop strings held back

Static KV layout: every row has its own length, so rows are prefilled on their own (`prefill_rows`, in chunks
the backend takes: its `chunk_limit`) and decoded together (`decode_rows`): the two steps the serving
scheduler (runtime/serving/scheduler.py) interleaves as requests come and go. A left-padded batch given to
generate_step is taken apart into its rows (rows of one length prefill together).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .kv import KVCache
from .params import ParamError
from .sampling import Sampler

log = logging.getLogger(__name__)


class ContextLengthError(ParamError):
    """The prompt (with max_new_tokens, for a static cache) does not fit the context; `param` says which to change."""

    code = "context_length_exceeded"


def fit_new_tokens(prompt_length: int, max_new_tokens: int | None, limit: int, static: bool = False) -> int:
    """max_new_tokens that fit the context `limit` (None: all the room left). A prompt that alone fills it is
    refused; so is one that leaves too little room in a static cache (its buffers cannot grow); otherwise
    max_new_tokens is cut to the room left, with a warning."""
    if prompt_length >= limit:
        raise ContextLengthError("prompt",
            f"the prompt has {prompt_length} tokens but the context holds {limit} (with room for at least one "
            f"new token); shorten the prompt, or export with a larger --max-length"
        )
    room = limit - prompt_length
    if max_new_tokens is None or max_new_tokens <= room:
        return room if max_new_tokens is None else max_new_tokens
    if static:
        raise ContextLengthError("max_new_tokens",
            f"the prompt has {prompt_length} tokens and {{param}} is {max_new_tokens}: "
            f"{prompt_length + max_new_tokens} tokens do not fit the static KV cache of {limit}; lower {{param}} "
            f"to {room} or less, or export with a larger --max-length"
        )
    log.warning("max_new_tokens %d cut to %d to fit the context of %d", max_new_tokens, room, limit)
    return room


@dataclass
class LoopBuffers:
    """The loop's arrays for one batch, allocated once: mask and token history [B, capacity] filled up
    to `length` columns, the next token [B, 1]."""

    mask: np.ndarray
    tokens: np.ndarray
    next_token: np.ndarray
    length: int

    @classmethod
    def allocate(cls, attention_mask: np.ndarray, input_ids: np.ndarray, max_new_tokens: int) -> "LoopBuffers":
        B, total = attention_mask.shape  # total = cached + new prompt tokens
        capacity = total + max_new_tokens
        mask = np.ones((B, capacity), np.int64)
        mask[:, :total] = attention_mask
        tokens = np.zeros((B, capacity), np.int64)
        tokens[:, total - input_ids.shape[1] : total] = input_ids
        return cls(mask, tokens, np.zeros((B, 1), np.int64), total)


def prefill_rows(cache: KVCache, rows: slice, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
    """Static layout: feed `ids` [n, S] to the n rows of `rows`, each after what it holds, in chunks of at most
    what the backend takes (`chunk_limit`: its max_chunk, a ring's room); logits [n, V] of the last token
    ([n, S, V] with all_logits)."""
    pieces, start = [], 0
    while start < ids.shape[1]:
        done = cache.lengths[rows]
        if len(done) > 1 and done.any() and not cache.rows_over_cache:  # the kernel takes one row then
            rest = [prefill_rows(cache, slice(r, r + 1), ids[i:i + 1, start:], all_logits)
                    for i, r in enumerate(range(rows.start, rows.stop))]
            pieces.append(np.concatenate(rest))
            break
        size = min(ids.shape[1] - start, cache.chunk_limit(done) or ids.shape[1])
        pieces.append(cache.feed(rows, ids[:, start:start + size], all_logits))
        start += size
    return np.concatenate(pieces, axis=1) if all_logits else pieces[-1]


def prefill_batch(cache: KVCache, input_ids: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Static layout: the real tokens of a left-padded batch (`new` marks them), each row after what it holds;
    rows next to each other with as many new tokens and as long a cache go in one run. Logits [B, V]."""
    counts, logits, row = new.sum(1), [], 0
    alone = not cache.rows_over_cache and cache.lengths.any()
    while row < len(counts):
        end = row + 1
        while (end < len(counts) and not alone and counts[end] == counts[row]
               and cache.lengths[end] == cache.lengths[row]):
            end += 1
        group = np.stack([input_ids[r][new[r]] for r in range(row, end)])
        logits.append(prefill_rows(cache, slice(row, end), group))
        row = end
    return np.concatenate(logits)


def generate_step(
    cache: KVCache,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    sampler: Sampler,
    max_new_tokens: int,
    use_history: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the next token of every row [B], `max_new_tokens` times (the caller may stop earlier).

    The rows continue after what `cache` holds (nothing, for a fresh cache; a chat's earlier turns): attention_mask
    [B, past + S] covers the cache and the new tokens, left-padded. `use_history` passes the tokens so far to the
    sampler (repetition penalty)."""
    B, S = input_ids.shape
    past = int(cache.lengths[0])
    if attention_mask.shape != (B, past + S):
        raise ValueError(f"attention_mask shape {attention_mask.shape} must be {(B, past + S)} (cache + new tokens)")
    buffers = LoopBuffers.allocate(attention_mask, input_ids, max_new_tokens)
    if cache.static:  # rows of their own, the pads left out
        logits = prefill_batch(cache, input_ids, attention_mask[:, past:].astype(bool))
    else:
        logits = cache.feed(slice(0, B), input_ids, mask=attention_mask)
    for step in range(max_new_tokens):
        history = buffers.tokens[:, past : buffers.length] if use_history else None
        token = sampler(logits, history)
        yield token
        if step + 1 < max_new_tokens:  # the last token is not fed: nothing would read its logits
            buffers.tokens[:, buffers.length] = token
            buffers.length += 1
            buffers.next_token[:, 0] = token
            mask = None if cache.static else buffers.mask[:, : buffers.length]
            logits = cache.feed(slice(0, B), buffers.next_token, mask=mask)


def generate_tokens(
    cache: KVCache,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    stop: Callable[[int, int], bool] | None = None,
    use_history: bool = False,
) -> np.ndarray:
    """New tokens [B, n], n <= max_new_tokens: each row ends at its first end token (kept) and is
    padded with pad_token_id after it, as transformers' generate does; generation stops when every
    row has ended. `stop(row, token) -> bool`, called with each new token of an unfinished row, can
    end a row early (stop strings)."""
    B = input_ids.shape[0]
    eos = np.asarray(sorted(eos_token_ids), dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    out = np.full((B, max_new_tokens), pad_token_id, dtype=np.int64)
    n = 0
    steps = generate_step(cache, input_ids, attention_mask, sampler, max_new_tokens, use_history)
    try:
        for n, token in enumerate(steps, start=1):
            out[:, n - 1] = np.where(done, pad_token_id, token)
            if stop is not None:
                for row in np.flatnonzero(~done):
                    done[row] = stop(int(row), int(token[row]))
            done |= np.isin(token, eos)
            if done.all():
                break
    finally:
        steps.close()
    return out[:, :n]


class TextStream:
    """One completion's text as its tokens come: `push(token)` returns the piece that is final now ("" while a
    character is incomplete or the text may still grow into a stop string), `finish()` the rest. The pieces
    concatenate to the decoded completion, cut before the first stop string; `stopped` is set once a stop string
    or an end token ended it."""

    def __init__(self, tokenizer, eos_token_ids, stop_strings=(), special_tokens: bool = False):
        """`special_tokens`: keep them in the text (a native tool call's markers), else skipped as decode() does."""
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=not special_tokens)
        self.eos = set(eos_token_ids)
        self.stop_strings = list(stop_strings)
        self.text, self.emitted = "", 0
        self.stopped = False
        self.end_token = False  # it was an end token (not a stop string) that ended the completion

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token in self.eos:
            self.stopped = self.end_token = True
            return ""
        piece = self.decoder.push(token)
        if not piece:
            return ""
        cut = stop_index(self.text + piece, self.stop_strings, start=len(self.text))
        self.text += piece
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self.text) - partial_stop(self.text, self.stop_strings))

    def finish(self) -> str:
        """What is still held back, once no token will come (nothing after a stop string)."""
        if self.stopped and not self.end_token:
            return ""
        self.text += self.decoder.flush()
        cut = stop_index(self.text, self.stop_strings)
        return self._emit(len(self.text) if cut is None else cut)

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


def stream(
    cache: KVCache,
    tokenizer,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: list[int],
    stop_strings: list[str] = (),
    use_history: bool = False,
    tokens: list[int] | None = None,
) -> Iterator[str]:
    """Text pieces of one row's completion as they are generated; they concatenate to the decoded
    completion, cut before the first stop string. Text that may still grow into a stop string is held
    back until it cannot. The generated token ids (end token included) are appended to `tokens`."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream takes one prompt, got a batch of {input_ids.shape[0]}")
    text = TextStream(tokenizer, eos_token_ids, stop_strings)
    steps = generate_step(cache, input_ids, attention_mask, sampler, max_new_tokens, use_history)
    try:
        for token in steps:
            token = int(token[0])
            if tokens is not None:
                tokens.append(token)
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                break
    finally:
        steps.close()
    piece = text.finish()
    if piece:
        yield piece


def stop_index(text: str, stop_strings, start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (the completion ends there), or None. Only matches
    ending after `start` are looked for (what was searched before cannot hold a new one)."""
    hits = [i for s in stop_strings if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def partial_stop(text: str, stop_strings) -> int:
    """Length of the longest end of `text` that begins some stop string (and so must be held back)."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class StopStrings:
    """`stop(row, token)` for generate_tokens: each row's text decoded incrementally, True once it
    holds one of the stop strings."""

    def __init__(self, tokenizer, stop_strings: list[str], batch_size: int):
        self.stop_strings = list(stop_strings)
        self.decoders = [tokenizer.stream_decoder() for _ in range(batch_size)]
        self.texts = [""] * batch_size

    def __call__(self, row: int, token: int) -> bool:
        piece = self.decoders[row].push(token)
        if not piece:
            return False
        before = len(self.texts[row])
        self.texts[row] += piece
        return stop_index(self.texts[row], self.stop_strings, start=before) is not None
