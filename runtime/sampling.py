"""Token samplers from pure numpy functions, as mlx-lm's sample_utils: each filter takes logits
[batch, vocab] float32 and returns them with the excluded tokens set to -inf.

`make_sampler` validates the options once and returns `sample(logits, history) -> tokens [batch]`.
The order is transformers': repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Sampler = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: seen tokens' logits divided (if > 0) or multiplied by it."""
    rows = np.arange(logits.shape[0])[:, None]
    seen = logits[rows, history]
    logits[rows, history] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]  # the k-th largest value per row
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (the top token always)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1)
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + np.log(min_p)
    return np.where(logits < threshold, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row (Gumbel-max: exact, no normalization needed)."""
    gumbel = -np.log(-np.log(rng.random(logits.shape, dtype=np.float64)))
    return (logits + gumbel).argmax(axis=-1)


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> Sampler:
    """A sampler for these options; temperature 0 means greedy. Out-of-range options are refused."""
    check_options(temperature, top_k, top_p, min_p, repetition_penalty)
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        logits = np.array(logits, dtype=np.float32)  # our own copy: the filters work in place
        if repetition_penalty != 1.0 and history is not None and history.size:
            logits = apply_repetition_penalty(logits, history, repetition_penalty)
        if temperature == 0.0:
            return greedy(logits)
        logits = logits / temperature
        if top_k:
            logits = top_k_filter(logits, top_k)
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
        if min_p > 0.0:
            logits = min_p_filter(logits, min_p)
        return categorical(logits, rng)

    return sample


def check_options(temperature, top_k, top_p, min_p, repetition_penalty) -> None:
    if not (temperature >= 0.0 and np.isfinite(temperature)):
        raise ValueError(f"temperature {temperature} is out of range; expected >= 0 (0 means greedy)")
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
        raise ValueError(f"top_k {top_k} is out of range; expected an integer >= 0 (0 disables it)")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p {top_p} is out of range; expected 0 < top_p <= 1 (1 disables it)")
    if not (0.0 <= min_p < 1.0):
        raise ValueError(f"min_p {min_p} is out of range; expected 0 <= min_p < 1 (0 disables it)")
    if not (repetition_penalty > 0.0 and np.isfinite(repetition_penalty)):
        raise ValueError(f"repetition_penalty {repetition_penalty} is out of range; expected > 0 (1 disables it)")
