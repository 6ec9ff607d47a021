"""The generation loop, as mlx-lm's generate_step: a generator that yields one token per row and step.

    prompt ids ─> prefill ─> logits ─> sample ─> token ─┐
                              ^                          │ yield
                              └──── decode step <────────┘

The backend owns the KV cache; the loop owns the attention mask, positions and the token history, in
buffers allocated once per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .sampling import Sampler

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt alone does not fit the model's (or the static cache's) context."""


@dataclass
class StepState:
    """Buffers of one batch: [batch, capacity], filled up to `length` columns."""

    mask: np.ndarray
    tokens: np.ndarray
    length: int


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate computes them: real tokens counted, pads at 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def fit_new_tokens(prompt_length: int, max_new_tokens: int, limit: int) -> int:
    """max_new_tokens cut to the context; a prompt that alone does not fit is refused."""
    if prompt_length >= limit:
        raise ContextLengthError(
            f"the prompt has {prompt_length} tokens but the context holds {limit} (with room for at least one "
            f"new token); shorten the prompt, or export with a larger --max-length"
        )
    if prompt_length + max_new_tokens > limit:
        log.warning("max_new_tokens %d cut to %d to fit the context of %d", max_new_tokens, limit - prompt_length, limit)
        return limit - prompt_length
    return max_new_tokens


def generate_step(
    backend: Backend,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    sampler: Sampler,
    max_new_tokens: int,
    use_history: bool = False,
    continue_cache: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the next token of every row, `max_new_tokens` times (the caller stops earlier at will).

    With `continue_cache` the backend's cache is kept (a chat's earlier turns) and `attention_mask`
    covers cache + new tokens; otherwise the cache is reset for this batch.
    """
    B, S = input_ids.shape
    past = backend.past_length if continue_cache else 0
    if not continue_cache:
        backend.reset(B, S + max_new_tokens)
    capacity = past + S + max_new_tokens
    state = StepState(np.ones((B, capacity), np.int64), np.zeros((B, capacity), np.int64), past + S)
    state.mask[:, : past + S] = attention_mask
    state.tokens[:, past : past + S] = input_ids

    logits = backend.forward(input_ids, state.mask[:, : state.length], positions(state.mask[:, : state.length])[:, past:])
    for step in range(max_new_tokens):
        history = state.tokens[:, : state.length] if use_history else None
        token = sampler(logits[:, -1], history).astype(np.int64)
        yield token
        if step == max_new_tokens - 1:
            return
        state.tokens[:, state.length] = token
        state.length += 1
        mask = state.mask[:, : state.length]
        position = (mask.sum(axis=-1, keepdims=True) - 1).astype(np.int64)  # [B, 1]
        logits = backend.forward(token[:, None], mask, position)


def generate_tokens(
    backend: Backend,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    stop=None,
    use_history: bool = False,
    continue_cache: bool = False,
) -> np.ndarray:
    """New tokens [batch, n]: each row ends at its first end token (kept) and is padded after it.
    `stop(row, tokens) -> bool` can end a row early (stop strings)."""
    B = input_ids.shape[0]
    eos = np.array(sorted(eos_token_ids), dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    out = []
    steps = generate_step(backend, input_ids, attention_mask, sampler, max_new_tokens, use_history, continue_cache)
    for token in steps:
        token = np.where(done, pad_token_id, token)
        out.append(token)
        done |= np.isin(token, eos)
        if stop is not None:
            tokens = np.stack(out, axis=1)
            for row in np.flatnonzero(~done):
                done[row] = stop(row, tokens[row])
        if done.all():
            steps.close()
            break
    return np.stack(out, axis=1) if out else np.zeros((B, 0), np.int64)
