"""Token samplers from pure numpy functions, as mlx-lm's sample_utils.

`make_sampler(...)` checks the options once and returns `sample(logits, history) -> tokens [batch]`,
where logits are [batch, vocab] float32 and history the tokens so far [batch, n] (for the repetition
penalty). The order is transformers': repetition penalty, temperature, top-k, top-p, min-p.

Gemma's vocabulary has 256k-262k entries, so nothing sorts a whole row: the filters run on the few
candidate tokens that can survive them (`candidates`), found with a partial selection, and the draw
inverts the cumulative distribution. The filters themselves (`top_k_filter`, `top_p_filter`,
`min_p_filter`) are plain functions on any [batch, n] array: excluded tokens become -inf.
"""

from __future__ import annotations


import numpy as np

CHUNK = 512  # block size of the two-level searches over a full vocabulary row


# -- filters: logits [B, n] -> logits with the excluded tokens at -inf ------------------------------


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it, in place: each seen token's logit is divided by the
    penalty if positive, multiplied by it if not."""
    rows = np.arange(logits.shape[0])[:, None]
    seen = logits[rows, history]
    logits[rows, history] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row (ties with the k-th are kept, as transformers does)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k:].min(axis=-1, keepdims=True)
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float, log_total: np.ndarray | None = None) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (the top token always).

    The probabilities are softmax(logits) unless `log_total` [B, 1] gives the log of the whole row's
    normalizer: then `logits` may be a subset of the row's candidates and p is still of the full mass."""
    if p >= 1.0:
        return logits
    if log_total is None:
        log_total = logsumexp(logits)
    order = np.argsort(-logits, axis=-1)
    probs = np.exp(np.take_along_axis(logits, order, axis=-1) - log_total)
    mass_above = np.cumsum(probs, axis=-1) - probs  # the mass of the tokens ranked above each one
    drop = np.empty_like(mass_above, dtype=bool)
    np.put_along_axis(drop, order, mass_above >= p, axis=-1)
    return np.where(drop, -np.inf, logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop the tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + np.log(min_p)
    return np.where(logits < threshold, -np.inf, logits)


# -- helpers -----------------------------------------------------------------------------------------


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) per row, [B, 1]."""
    top = logits.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True, dtype=np.float64))


def log_softmax_top(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of `token` under softmax(logits [V]) and the k most likely tokens with theirs, most
    likely first (what OpenAI's `logprobs` reports)."""
    row = logits.astype(np.float32)[None]
    total = float(logsumexp(row)[0, 0])
    top = top_indices(row, k)[0] if k else np.zeros(0, np.int64)
    top = top[np.argsort(-row[0, top], kind="stable")]
    return float(row[0, token]) - total, tuple((int(t), float(row[0, t]) - total) for t in top)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_indices(logits: np.ndarray, m: int) -> np.ndarray:
    """Indices [B, m] of the m largest logits of each row, in no particular order.

    On a long row the m-th largest block maximum bounds the m-th largest value from below, so only
    the few values above it are partitioned, instead of the whole row."""
    B, V = logits.shape
    if m >= V:
        return np.broadcast_to(np.arange(V), (B, V))
    blocks = V // CHUNK
    if V % CHUNK or m > blocks // 2:
        return np.argpartition(logits, V - m, axis=-1)[:, V - m :]
    block_max = logits.reshape(B, blocks, CHUNK).max(axis=-1)
    bound = np.partition(block_max, blocks - m, axis=-1)[:, blocks - m]
    out = np.empty((B, m), dtype=np.int64)
    for row in range(B):
        above = np.flatnonzero(logits[row] >= bound[row])  # at least m values, usually few more
        out[row] = above[np.argpartition(logits[row, above], len(above) - m)[len(above) - m :]]
    return out


def candidates(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float):
    """The tokens that can survive top-k, top-p and min-p, as (indices [B, m], their logits / temperature
    [B, m], log of the full row's normalizer [B, 1] or None when top-k already renormalized the row).
    A superset: the filters then run on it, exactly as they would on the whole row."""
    V = logits.shape[-1]
    if top_k:
        idx = top_indices(logits, min(top_k, V))
        return idx, np.take_along_axis(logits, idx, axis=-1) / temperature, None
    scaled_max = logits.max(axis=-1, keepdims=True) / temperature
    log_total = logsumexp(logits / temperature) if top_p < 1.0 else None
    if top_p < 1.0:  # grow the set until it holds the mass p in every row
        m = 64
        while m < V:
            idx = top_indices(logits, m)
            sub = np.take_along_axis(logits, idx, axis=-1) / temperature
            if (np.exp(sub - log_total).sum(axis=-1) >= top_p).all():
                return idx, sub, log_total
            m *= 8
        idx = np.broadcast_to(np.arange(V), logits.shape)
        return idx, logits / temperature, log_total
    # min-p alone: the tokens within log(min_p) of the top one
    m = int((logits / temperature >= scaled_max + np.log(min_p)).sum(axis=-1).max())
    idx = top_indices(logits, m)
    return idx, np.take_along_axis(logits, idx, axis=-1) / temperature, None


def categorical(logits: np.ndarray, rng: np.random.Generator, in_place: bool = False) -> np.ndarray:
    """One draw per row from softmax(logits), -inf entries never drawn: the inverse of the cumulative
    distribution at a uniform variate. A full vocabulary row is searched in two levels (block sums,
    then inside one block) to keep the pass over 262k entries to one exp and one sum. `in_place`: the logits are
    a scratch array this call may overwrite (no 1 MB allocation a row)."""
    weights = logits if in_place else logits.copy()
    weights -= weights.max(axis=-1, keepdims=True)
    np.exp(weights, out=weights)
    u = rng.random(logits.shape[0])
    B, V = weights.shape
    if V % CHUNK or V < 8 * CHUNK:
        return _invert(weights, u)
    blocks = weights.reshape(B, V // CHUNK, CHUNK)
    sums = blocks.sum(axis=-1, dtype=np.float64)
    block, rest = _invert(sums, u, return_rest=True)
    inner = blocks[np.arange(B), block]  # [B, CHUNK]
    return block * CHUNK + _invert(inner, rest, absolute=True)


def _invert(weights: np.ndarray, u: np.ndarray, return_rest: bool = False, absolute: bool = False):
    """First index whose cumulative weight exceeds u * total (u * 1 when `absolute`, u then being a
    weight); with return_rest also the weight left below the target within that index."""
    cdf = np.cumsum(weights, axis=-1, dtype=np.float64)
    total = cdf[:, -1]
    target = u if absolute else u * total
    target = np.minimum(target, np.nextafter(total, 0))  # rounding never walks past the last token
    index = (cdf <= target[:, None]).sum(axis=-1)
    if not return_rest:
        return index
    before = np.where(index > 0, cdf[np.arange(len(index)), np.maximum(index - 1, 0)], 0.0)
    return index, target - before


# -- the sampler -------------------------------------------------------------------------------------


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None) -> Sampler:
    """`sample(logits [B, V], history [B, n] | None) -> tokens [B]` for these options (checked by
    runtime.params.SamplingParams: ParamError for a value out of range)."""
    from .params import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed).sampler()


def process(logits: np.ndarray, params, history: np.ndarray | None = None):
    """The logits [B, V] as the sampler draws from them, in transformers' order: the repetition penalty over
    `history` [B, n], the temperature, then top-k, top-p and min-p over the candidates that can survive them.
    Returns (candidate token ids [B, m], or None for whole rows; logits [B, m], excluded tokens at -inf, our own
    array). Greedy (temperature 0): the penalized rows, whose argmax is the token. runtime/speculative.py's verify
    processes the target's rows with this too."""
    temperature = 0.0 if params.greedy else params.temperature
    # Our own copy, the temperature applied: the penalty then works on it in place (it divides or multiplies by a
    # positive factor by sign, which a positive temperature keeps: the order does not matter).
    logits = np.multiply(logits, np.float32(1.0 / temperature) if temperature else np.float32(1.0), dtype=np.float32)
    if params.repetition_penalty != 1.0 and history is not None and history.size:
        apply_repetition_penalty(logits, history, params.repetition_penalty)
    top_k = max(params.top_k, 0)
    if not temperature or not (top_k or params.top_p < 1.0 or params.min_p > 0.0):
        return None, logits
    idx, sub, log_total = candidates(logits, 1.0, top_k, params.top_p, params.min_p)  # the temperature is applied
    sub = top_k_filter(sub, top_k)
    sub = top_p_filter(sub, params.top_p, log_total)
    return idx, min_p_filter(sub, params.min_p)


def draw(idx: np.ndarray | None, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits [B, m]) (one uniform each); `logits` is scratch after it."""
    choice = categorical(logits, rng, in_place=True)
    return choice if idx is None else np.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


class Sampler:
    """`sample(logits [B, V], history [B, n] | None) -> tokens [B]` for checked SamplingParams; temperature 0 (or below
    GREEDY_BELOW) is greedy. `rng` is the request's own Generator (seeded: the same draws whatever shares a batch)."""

    def __init__(self, params):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        params = self.params
        if params.greedy and (params.repetition_penalty == 1.0 or history is None or not history.size):
            return greedy(logits)
        idx, processed = process(logits, params, history)
        if params.greedy:
            return greedy(processed)
        return draw(idx, processed, self.rng)
