"""Speculative decoding's per-request parts: proposers, exact verification, acceptance counters.

    proposer = NgramProposer(min_n=1, max_n=4)              one per request (it indexes the request's tokens)
    proposer = DraftModel(runtime.load(DRAFT), rows).for_row(row)   or a draft artifact's greedy tokens
    draft = proposer.propose(request.tokens, k)             0..k tokens, a few microseconds
    logits = <one target run over [last token] + draft>     [len(draft) + 1, V]: the last token's and each draft's
    accepted, token = verify(draft, logits, params, rng, history=request.tokens)
    request.tokens += accepted + [token]; the row's KV keeps len(request.tokens) - 1 tokens (rejected ones roll back)
    stats.observe(len(draft), len(accepted))

Exactness. Greedy: the longest prefix of the draft equal to the target's argmax at each position, then the argmax
after it: the tokens plain greedy decoding gives. Sampling: the rejection rule of Leviathan et al. 2023 and Chen et
al. 2023 (accept x with probability min(1, p(x) / q(x)); at the first rejection draw from norm(max(0, p - q)); after
k acceptances draw from p), with p the target's distribution after the request's processing, exactly as
runtime.sampling's sampler computes it (repetition penalty over the tokens so far and the accepted draft,
temperature, top-k, top-p, min-p; its functions, in its order), so the output's distribution is the target's.

The RNG contract: `rng` is the request's own numpy Generator (np.random.default_rng(params.seed)), used by nothing
else, so a seeded request samples the same whatever shares the batch.
  - greedy: no draws.
  - a point-mass draft (n-gram: q(x) = 1; `draft_probs` None): one uniform per emitted token, each through
    runtime.sampling.categorical exactly as the plain sampler draws it. At position i the target's token y is drawn
    from p; x is accepted if y == x, else y is the next token. That is the rejection rule for q = 1{x}: x is kept
    with probability p(x), and a rejected draw is distributed as p without x renormalized, norm(max(0, p - q)).
    So with the same Generator and the same logits a request's tokens are those of plain sampling, token for token;
    `verify([], logits[None], ...)` is the plain sampler. (This draw-and-compare is exact for any draft, since the
    emitted tokens are p's draws; for a draft sampled from q it accepts with probability sum q p only, where the
    rule with q accepts sum min(p, q): pass a draft model's q.)
  - a draft model's draft (`draft_probs` q [k, V]): one uniform per examined draft position (the acceptance test
    u * q(x) < p(x)), then one draw for the last token (from the residual after a rejection, from p after k
    acceptances). The draft model samples its tokens with its own per-request Generator.

Nothing here sorts a 262k row: the sampler's `candidates` picks the tokens that can survive the filters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from .sampling import categorical, draw, process

# -- proposers ---------------------------------------------------------------------------------------


@runtime_checkable
class Proposer(Protocol):
    """Drafts for one request: `propose(tokens, k)` -> 0..k tokens likely to follow `tokens` (the request's tokens
    so far, prompt and generated: a list that only grows between calls)."""

    def propose(self, tokens: Sequence[int], k: int) -> list[int]: ...


@runtime_checkable
class DraftModelProposer(Proposer, Protocol):
    """What a draft model (another artifact with the same tokenizer, its KV rows beside the target's) implements.

    `propose(tokens, k)` feeds the draft model what its row lacks of `tokens` (its row may hold a longer sequence:
    the last proposal's rejected tokens roll back by the row's length, as the target's do), then decodes k tokens,
    each drawn from the draft's distribution q after the request's processing (the same SamplingParams: penalty,
    temperature, top-k/p, min-p; argmax under greedy) with the proposer's own per-request Generator.
    `draft_probs()` returns those q of the last proposal, [len(draft), V] float (each row sums to 1, q(x_i) > 0),
    for `verify(..., draft_probs=...)`; None under greedy, where verification needs no q."""

    def draft_probs(self) -> np.ndarray | None: ...


def _check_ngram_sizes(min_n: int, max_n: int) -> None:
    if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 1:
        raise ValueError(f"min_n {min_n!r} is out of range; expected an integer >= 1")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < min_n:
        raise ValueError(f"max_n {max_n!r} is out of range; expected an integer >= min_n ({min_n})")


def _continuation(tokens: Sequence[int], start: int, k: int) -> list[int]:
    """The k tokens from `start` on; where they would pass the end, the draft continues itself (a match close to
    the end is a loop: `a b c a b` matched at the first `a b` drafts `c a b c a ...`, as llama.cpp's lookup keeps
    looking up n-grams of the sequence and the draft so far)."""
    length = len(tokens)
    out: list[int] = []
    for j in range(k):
        out.append(int(tokens[start + j]) if start + j < length else out[start + j - length])
    return out


def ngram_draft(tokens: Sequence[int], k: int, min_n: int = 1, max_n: int = 4) -> list[int]:
    """Prompt lookup without state: for n from max_n down to min_n, the last n tokens' most recent earlier
    occurrence in `tokens`, and the k tokens that followed it ([] when no n-gram recurs).

    O(len(tokens) * n) per call (numpy over every window): the reference NgramProposer is tested against, and a
    stateless choice for short sequences. vLLM's proposer (a KMP pass, numba) takes the earliest occurrence of the
    longest match; the most recent one is taken here (the text being copied, or the loop being repeated): on the
    held-out copy prompts it drafted as well or slightly better (docs/speculative.md)."""
    _check_ngram_sizes(min_n, max_n)
    if k <= 0:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    for n in range(max_n, min_n - 1, -1):
        if length <= n:  # no earlier window that a token follows
            continue
        windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)  # [length - n, n], each followed
        hits = np.flatnonzero((windows == seq[length - n :]).all(axis=1))
        if hits.size:
            return _continuation(seq, int(hits[-1]) + n, k)
    return []


class NgramProposer:
    """Prompt lookup (vLLM's `ngram` method, llama.cpp's lookup decoding) with an index kept between steps.

    For each n in [min_n, max_n], a dict from every n-gram of the request's tokens to the position right after its
    latest occurrence; `propose(tokens, k)` indexes the tokens it has not seen yet (one dict store per n per token)
    and looks the last max_n .. min_n tokens up, longest first. A step then costs O(new tokens * n-gram sizes)
    instead of a scan of the whole sequence: a few microseconds at any length (docs/speculative.md has the
    figures against `ngram_draft`'s scan). One instance per request; its tokens only grow (accepted tokens are
    appended, rejected ones never were), and a sequence that does not extend the indexed one is indexed anew.
    Memory: about max_n - min_n + 1 dict entries per token."""

    def __init__(self, min_n: int = 1, max_n: int = 4):
        _check_ngram_sizes(min_n, max_n)
        self.min_n, self.max_n = min_n, max_n
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(self.min_n, self.max_n + 1)}

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Index `new_tokens`, appended to the sequence: the n-grams they complete now point past themselves."""
        tokens = self.tokens
        for token in new_tokens:
            i = len(tokens)
            for n, after in self._after.items():
                if i >= n:
                    after[tuple(tokens[i - n : i])] = i
            tokens.append(int(token))

    def draft(self, k: int) -> list[int]:
        """Up to k tokens after the indexed sequence: the continuation of its longest recurring suffix."""
        tokens = self.tokens
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) <= n:
                continue
            start = self._after[n].get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return _continuation(tokens, start, k)
        return []

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        seen = len(self.tokens)
        if len(tokens) < seen or (seen and tokens[seen - 1] != self.tokens[-1]):
            self.reset()  # not the sequence indexed so far
            seen = 0
        self.extend(tokens[seen:])
        return self.draft(k)


class DraftModel:
    """A draft artifact beside the target in one engine (vLLM's draft-model method): a smaller static-layout artifact
    with the target's tokenizer, whose KV row r drafts for the target's row r. Its drafts are its greedy tokens, a
    point-mass q: verification's draw-and-compare is then the rejection rule exactly (greedy and sampled outputs are
    the target's; a sampled request accepts a draft token with probability p(x)).

    `for_row(row)` is a request's proposer. Each proposal keeps the longest prefix of the request's tokens the draft's
    row still holds (what it drafted and the target rejected is cut, as the target's row rolls back), feeds the rest
    in chunks, then runs k - 1 more times, one token each: k runs of the draft for k tokens. A draft stops short of a
    windowed cache's compaction, so that the next proposal keeps its prefix (runtime/kv.py, rollback_room)."""

    def __init__(self, model, rows: int, chunk: int = 256):
        from .kv import KVCache

        self.model = model
        self.kv = KVCache(model.backend, rows)
        self.chunk = min(chunk, model.backend.max_chunk or chunk)

    def for_row(self, row: int) -> "DraftRow":
        return DraftRow(self, row)

    def propose(self, row: int, tokens: Sequence[int], k: int) -> list[int]:
        kv, rows = self.kv, slice(row, row + 1)
        if len(tokens) + k > kv.max_length:
            return []  # past the draft's buffers: the target goes on alone
        kv.keep(row, kv.prefix(row, tokens))
        fed = len(kv.tokens[row])
        while fed < len(tokens):  # the request's tokens the row lacks (at least the last one: its logits)
            size = min(len(tokens) - fed, self.chunk, kv.chunk_limit(fed) or self.chunk)
            logits = kv.feed(rows, np.asarray([tokens[fed:fed + size]], np.int64))
            fed += size
        k = min(k, kv.rollback_room(fed, k - 1) + 1)
        draft = [int(logits[0].argmax())]
        while len(draft) < k:
            logits = kv.feed(rows, np.asarray([draft[-1:]], np.int64))
            draft.append(int(logits[0].argmax()))
        return draft


class DraftRow:
    """DraftModel's proposer for one request (Proposer): the draft model's row of the request's target row."""

    def __init__(self, draft: DraftModel, row: int):
        self.draft, self.row = draft, row

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        return self.draft.propose(self.row, tokens, k) if k > 0 else []


# -- verification ------------------------------------------------------------------------------------


def processed_logits(row: np.ndarray, params, history: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
    """The target's processed logits for one position [V], as the sampler draws from them
    (runtime.sampling.process): (candidate ids [1, m] or None, logits [1, m]); softmax of them is p."""
    return process(row[None], params, history)


def _draw(idx: np.ndarray | None, logits: np.ndarray, rng: np.random.Generator) -> int:
    """One token from softmax(logits [1, m]): the sampler's own draw (one uniform); `logits` is scratch after it."""
    return int(draw(idx, logits, rng)[0])


def _probs(idx: np.ndarray | None, logits: np.ndarray, vocab: int) -> np.ndarray:
    """p as a dense [V] float64 row from processed logits (excluded tokens 0)."""
    weights = np.exp(logits[0].astype(np.float64) - logits[0].max())
    weights /= weights.sum()
    if idx is None:
        return weights
    dense = np.zeros(vocab)
    dense[idx[0]] = weights
    return dense


def verify(draft: Sequence[int], target_logits: np.ndarray, params, rng: np.random.Generator | None,
           draft_probs: np.ndarray | None = None, history: Sequence[int] | np.ndarray | None = None,
           ) -> tuple[list[int], int]:
    """The draft tokens the target accepts and the token after them, exactly as the target alone would sample.

    `draft` [k] the proposed tokens; `target_logits` [k + 1, V] the target's logits at the last token and at each
    draft token (row i predicts the token after draft[:i]); `params` the request's SamplingParams; `rng` its
    Generator (None under greedy); `draft_probs` [k, V] the draft model's q (None: point masses, as n-gram drafts
    are); `history` the request's tokens before the draft, needed when repetition_penalty != 1 (row i is penalized
    over history + draft[:i], as plain decoding would have it). Rows are processed one at a time and only up to
    the first rejection. The module's docstring has the rule and the RNG contract."""
    draft = [int(t) for t in draft]
    target_logits = np.asarray(target_logits)
    k = len(draft)
    if target_logits.ndim != 2 or target_logits.shape[0] != k + 1:
        raise ValueError(f"target_logits shape {target_logits.shape} does not fit a draft of {k} tokens; expected "
                         f"[{k + 1}, vocab]: the logits at the last token and at each draft token")
    vocab = target_logits.shape[1]
    if any(not 0 <= t < vocab for t in draft):
        raise ValueError(f"draft {draft} has a token outside the vocabulary [0, {vocab})")
    greedy = params.greedy
    penalize = params.repetition_penalty != 1.0
    if penalize and history is None:
        raise ValueError(f"repetition_penalty {params.repetition_penalty} needs the request's tokens: pass "
                         "history=request.tokens")
    if draft_probs is not None and not greedy:
        draft_probs = np.asarray(draft_probs)
        if draft_probs.shape != (k, vocab):
            raise ValueError(f"draft_probs shape {draft_probs.shape} does not fit the draft; expected [{k}, {vocab}]")
    if rng is None and not greedy:
        raise ValueError("sampling (temperature > 0) needs the request's numpy Generator: pass rng=")
    sequence, base = None, 0
    if penalize:  # [1, n + k]: row i is penalized over its first n + i tokens
        before = np.asarray(history, dtype=np.int64).reshape(-1)
        sequence, base = np.concatenate([before, np.asarray(draft, dtype=np.int64)])[None], len(before)

    def row(i: int) -> tuple[np.ndarray | None, np.ndarray]:
        return processed_logits(target_logits[i], params, sequence[:, : base + i] if penalize else None)

    accepted: list[int] = []
    if greedy:
        for i, token in enumerate(draft):
            best = int(target_logits[i].argmax() if not penalize else row(i)[1].argmax())
            if best != token:
                return accepted, best
            accepted.append(token)
        return accepted, int(target_logits[k].argmax() if not penalize else row(k)[1].argmax())

    for i, token in enumerate(draft):
        idx, logits = row(i)
        if draft_probs is None:  # q = 1{token}: draw from p, keep the draft while they agree
            drawn = _draw(idx, logits, rng)
            if drawn != token:
                return accepted, drawn
        else:
            p, q = _probs(idx, logits, vocab), draft_probs[i].astype(np.float64)
            if q[token] <= 0.0:
                raise ValueError(f"draft_probs gives draft token {token} (position {i}) probability 0: q must be "
                                 "the distribution the draft was sampled from")
            if not rng.random() * q[token] < p[token]:  # rejected: u >= p(x) / q(x)
                residual = np.maximum(p - q, 0.0)
                if residual.sum() <= 0.0:  # p == q up to rounding: rejection had probability 0
                    residual = p
                with np.errstate(divide="ignore"):
                    return accepted, int(categorical(np.log(residual)[None], rng)[0])
        accepted.append(token)
    return accepted, _draw(*row(k), rng)


# -- metrics -----------------------------------------------------------------------------------------

@dataclass
class SpecDecodeStats:
    """Counts over verified drafts, as vLLM's SpecDecodingStats: drafts (non-empty ones only), draft tokens,
    accepted tokens, and accepted tokens per draft position (position i counts drafts whose first i + 1 tokens
    were accepted). Acceptance rate = accepted / draft tokens; mean acceptance length (tokens per target run,
    the last sampled one included) = 1 + accepted / drafts; per-position rate = accepted at i / drafts."""

    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.num_spec_tokens, bool) or not isinstance(self.num_spec_tokens, int) \
                or self.num_spec_tokens < 1:
            raise ValueError(f"num_spec_tokens {self.num_spec_tokens!r} is out of range; expected an integer >= 1")
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """One verified draft; an empty one (nothing proposed) is not a draft, as vLLM counts."""
        assert 0 <= num_accepted_tokens <= num_draft_tokens <= self.num_spec_tokens, (num_draft_tokens,
                                                                                     num_accepted_tokens)
        if not num_draft_tokens:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for i in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[i] += 1

    def merge(self, other: "SpecDecodeStats") -> None:
        """Add another step's (or request's) counts to these."""
        if other.num_spec_tokens != self.num_spec_tokens:
            raise ValueError(f"cannot merge stats of {other.num_spec_tokens} positions into {self.num_spec_tokens}")
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_accepted_tokens_per_pos = [a + b for a, b in zip(self.num_accepted_tokens_per_pos,
                                                                  other.num_accepted_tokens_per_pos)]

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        return [a / self.num_drafts if self.num_drafts else float("nan") for a in self.num_accepted_tokens_per_pos]
