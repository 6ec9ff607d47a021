"""Speculative decoding's request-side parts on tiny synthetic models: the n-gram proposer against its stateless
reference, greedy and seeded verification token for token against plain decoding, and the sampled output's
distribution against the exact target distribution (a chi-square test that a wrong rule fails)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.params import SamplingParams as Params
from runtime.speculative import (
    DraftModelProposer,
    NgramProposer,
    Proposer,
    SpecDecodeStats,
    ngram_draft,
    verify,
)



# -- a tiny model: logits of the next token from the last two ------------------------------------------------


class TinyModel:
    """logits(tokens) = (E[last] + 0.5 F[second last]) W * scale: any vocabulary size, deterministic, cheap."""

    def __init__(self, vocab: int, seed: int, scale: float = 3.0, dim: int = 8):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.e, self.f = rng.normal(size=(2, vocab, dim))
        self.w = rng.normal(size=(dim, vocab)) * scale / math.sqrt(dim)

    def logits(self, tokens: list[int]) -> np.ndarray:
        prev2 = tokens[-2] if len(tokens) > 1 else 0
        return ((self.e[tokens[-1]] + 0.5 * self.f[prev2]) @ self.w).astype(np.float32)  # [V]

    def perturbed(self, noise: float, seed: int) -> "TinyModel":
        """A draft model: these weights plus noise (close enough that its drafts are often accepted)."""
        rng = np.random.default_rng(seed)
        other = TinyModel.__new__(TinyModel)
        other.vocab = self.vocab
        other.e, other.f, other.w = (x + noise * x.std() * rng.normal(size=x.shape) for x in (self.e, self.f, self.w))
        return other

    def rows(self, tokens: list[int], draft: list[int]) -> np.ndarray:
        """What one target run over [last token] + draft returns: [len(draft) + 1, V]."""
        return np.stack([self.logits(tokens + draft[:i]) for i in range(len(draft) + 1)])


def plain_decode(model: TinyModel, prompt: list[int], params, n: int) -> list[int]:
    """The reference: one token per step from runtime.sampling's sampler (history = every token so far)."""
    sample = params.sampler()
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(sample(model.logits(tokens)[None], np.array([tokens]))[0]))
    return tokens[len(prompt):]


def speculative_decode(model: TinyModel, prompt: list[int], params, n: int, propose, k: int,
                       stats: SpecDecodeStats | None = None) -> list[int]:
    """The engine's loop for one request: propose, one target run, verify, append."""
    rng = np.random.default_rng(params.seed)
    tokens = list(prompt)
    while len(tokens) < len(prompt) + n:
        draft = propose(tokens, k)
        accepted, token = verify(draft, model.rows(tokens, draft), params, rng, history=tokens)
        if stats is not None:
            stats.observe(len(draft), len(accepted))
        tokens += accepted + [token]
    return tokens[len(prompt):len(prompt) + n]


# -- proposers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, k, expected", [
    ([1, 2, 3, 4, 2, 3], 3, [4, 2, 3]),  # "2 3" recurs (vLLM's docstring example)
    ([1, 2, 3, 4, 2, 3], 5, [4, 2, 3, 4, 2]),  # past the end the draft continues itself: a loop
    ([9, 1, 5, 8, 1, 6, 7, 1], 2, [6, 7]),  # "1" recurs twice: the most recent occurrence's continuation
    ([3, 4, 5, 9, 4, 6, 3, 4], 2, [5, 9]),  # the longest recurring suffix ("3 4") wins over a more recent "4"
    ([7, 7, 7], 3, [7, 7, 7]),  # overlapping occurrences
    ([1, 2, 3], 3, []),  # nothing recurs
    ([1, 2, 3, 1], 0, []),
])
def test_ngram_drafts_the_continuation_of_the_longest_recurring_suffix(tokens, k, expected):
    assert ngram_draft(tokens, k) == expected
    assert NgramProposer().propose(tokens, k) == expected


def test_ngram_sizes_bound_the_match():
    tokens = [5, 1, 2, 6, 2]
    assert NgramProposer(min_n=1).propose(tokens, 2) == [6, 2]
    assert NgramProposer(min_n=2).propose(tokens, 2) == []  # only a 1-gram recurs
    assert NgramProposer(min_n=1, max_n=1).propose([3, 4, 5, 9, 4, 6, 3, 4], 2) == [6, 3]  # "4" alone: the latest


@pytest.mark.parametrize("min_n, max_n, alphabet", [(1, 4, 6), (2, 3, 4), (1, 1, 12), (3, 6, 3)])
def test_ngram_index_equals_the_scan_as_the_sequence_grows(min_n, max_n, alphabet):
    rng = np.random.default_rng(min_n * 100 + max_n * 10 + alphabet)
    proposer = NgramProposer(min_n, max_n)
    tokens: list[int] = []
    found = 0
    while len(tokens) < 400:
        tokens += rng.integers(0, alphabet, size=int(rng.integers(1, 6))).tolist()
        k = int(rng.integers(1, 9))
        draft = proposer.propose(tokens, k)
        assert draft == ngram_draft(tokens, k, min_n, max_n), len(tokens)
        found += bool(draft)
    assert found > 20  # the comparison covered real matches


def test_ngram_proposer_indexes_a_different_sequence_anew():
    proposer = NgramProposer()
    assert proposer.propose([1, 2, 3, 1, 2], 2) == [3, 1]
    assert proposer.propose([4, 5, 4], 2) == [5, 4]  # shorter: not the indexed sequence
    assert proposer.propose([4, 5, 6, 4, 9, 9], 1) == [9]  # same length prefix, other tokens
    assert proposer.tokens == [4, 5, 6, 4, 9, 9]


@pytest.mark.parametrize("kw", [{"min_n": 0}, {"min_n": 3, "max_n": 2}, {"max_n": 2.0}, {"min_n": True}])
def test_ngram_sizes_out_of_range_are_refused(kw):
    with pytest.raises(ValueError, match="out of range"):
        NgramProposer(**kw)


def test_proposer_protocols():
    assert isinstance(NgramProposer(), Proposer)
    assert not isinstance(NgramProposer(), DraftModelProposer)  # it has no q to give

    class Draft:
        def propose(self, tokens, k):
            return []

        def draft_probs(self):
            return None

    assert isinstance(Draft(), DraftModelProposer)


# -- greedy ------------------------------------------------------------------------------------------


def noisy_ngram(seed: int):
    """n-gram drafts with one token in four replaced: both acceptances and rejections happen."""
    proposer, rng = NgramProposer(), np.random.default_rng(seed)

    def propose(tokens, k):
        draft = proposer.propose(tokens, k)
        return [int(rng.integers(0, 16)) if rng.random() < 0.25 else t for t in draft]

    return propose


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_is_token_for_token_plain_greedy(penalty, k):
    model = TinyModel(16, seed=1)
    params = Params(temperature=0.0, repetition_penalty=penalty)
    stats = SpecDecodeStats(k)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    spec = speculative_decode(model, prompt, params, 120, noisy_ngram(0), k, stats)
    assert spec == plain_decode(model, prompt, params, 120)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # drafts were both kept and cut


def test_greedy_draws_nothing_and_needs_no_rng():
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
    assert verify([1, 0], logits, Params(), None) == ([1, 0], 2)
    assert verify([1, 2], logits, Params(), None) == ([1], 0)
    assert verify([2, 0], logits, Params(), None) == ([], 1)
    assert verify([], logits[:1], Params(), None) == ([], 1)


# -- seeded sampling: point-mass drafts are the plain sampler's draws -------------------------------------------


@pytest.mark.parametrize("vocab, options", [
    (16, {"temperature": 1.0}),
    (16, {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.3}),
    (16, {"temperature": 1.2, "top_p": 0.8, "min_p": 0.05}),
    (262144, {"temperature": 0.8, "top_p": 0.9}),  # Gemma's row: the two-level draw, candidates grown for top-p
    (262144, {"temperature": 1.0}),
])
def test_seeded_sampling_with_ngram_drafts_is_plain_sampling(vocab, options):
    model = TinyModel(vocab, seed=2, scale=4.0 if vocab == 16 else 12.0)
    params = Params(seed=11, **options)
    stats = SpecDecodeStats(3)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    n = 80 if vocab == 16 else 12
    spec = speculative_decode(model, prompt, params, n, noisy_ngram(1), 3, stats)
    assert spec == plain_decode(model, prompt, params, n)
    if vocab == 16:
        assert stats.num_accepted_tokens > 0


def uniforms_used(rng: np.random.Generator, seed: int) -> int:
    """How many uniforms `rng` drew since it was np.random.default_rng(seed)."""
    fresh = np.random.default_rng(seed)
    for n in range(100):
        if fresh.bit_generator.state == rng.bit_generator.state:
            return n
        fresh.random()
    raise AssertionError("not a whole number of uniforms")


def test_rng_use_is_one_uniform_per_emitted_token_and_per_tested_draft():
    model = TinyModel(8, seed=3)
    params = Params(temperature=1.0, seed=5)
    tokens = [1, 2, 3]
    for draft in ([], [0], [0, 1, 2], [int(model.logits(tokens).argmax())] * 3):
        rng = np.random.default_rng(5)
        accepted, _ = verify(draft, model.rows(tokens, draft), params, rng)
        assert uniforms_used(rng, 5) == len(accepted) + 1
    q = np.full((3, 8), 1 / 8)
    for draft in ([0, 1, 2], [5, 5, 5], [7, 0, 3]):
        rng = np.random.default_rng(5)
        accepted, _ = verify(draft, model.rows(tokens, draft), params, rng, draft_probs=q)
        rejected = len(accepted) < len(draft)
        assert uniforms_used(rng, 5) == len(accepted) + 1 + rejected


# -- the output's distribution: chi-square against the exact target -------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x): the regularized upper incomplete gamma Q(df / 2, x / 2)
    (series below a + 1, continued fraction above, as Numerical Recipes' gammq)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= x / (a + n)
            total += term
            if term < total * 1e-15:
                break
        return 1.0 - total * math.exp(log_front)
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)
    h = d
    for n in range(1, 1000):
        an = -n * (n - a)
        b += 2
        d = 1 / (an * d + b if abs(an * d + b) > 1e-300 else 1e-300)
        c = b + an / c if abs(b + an / c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def test_chi2_sf_on_known_quantiles():
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(18.307038, 10) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(79.081944, 60) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(7.0, 2) == pytest.approx(math.exp(-3.5), rel=1e-9)


def target_probs(logits: np.ndarray, params, history: list[int]) -> np.ndarray:
    """The processed distribution, written out on a small row (sorting is fine here): penalty, temperature,
    top-k, top-p, min-p, as transformers orders them. Independent of runtime.sampling."""
    x = logits.astype(np.float64).copy()
    for t in set(history):
        x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    x /= params.temperature
    if params.top_k > 0:
        x[x < np.sort(x)[-params.top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        p[order[above >= params.top_p]] = 0.0
        p /= p.sum()
    if params.min_p > 0.0:
        p[p < params.min_p * p.max()] = 0.0
        p /= p.sum()
    return p


def first_two_exact(model: TinyModel, prompt: list[int], params) -> np.ndarray:
    """P(first two generated tokens) [V, V] under plain sampling from the target."""
    p1 = target_probs(model.logits(prompt), params, prompt)
    return np.stack([p1[a] * target_probs(model.logits(prompt + [a]), params, prompt + [a])
                     for a in range(model.vocab)])


def first_two_counts(model: TinyModel, prompt: list[int], params, draws: int, k: int, drafter: str,
                     rule=verify, stats: SpecDecodeStats | None = None) -> np.ndarray:
    """Counts [V, V] of the first two tokens over `draws` seeded speculative runs of `rule`. drafter "point": the
    draft model's argmax; "sampled": drawn from its distribution q, verified with q; "sampled-without-q": the same
    drafts verified as point masses."""
    draft_model = model.perturbed(0.15, seed=99)  # its drafts accepted 20-80% of the time per position
    counts = np.zeros((model.vocab, model.vocab), np.int64)
    for run in range(draws):
        rng, draft_rng = np.random.default_rng([run, 0]), np.random.default_rng([run, 1])
        tokens = list(prompt)
        while len(tokens) < len(prompt) + 2:
            draft, q = [], []
            for _ in range(k):
                if drafter == "point":  # deterministic: the draft model's argmax
                    draft.append(int(draft_model.logits(tokens + draft).argmax()))
                else:  # sampled from the draft model's own distribution q
                    q.append(target_probs(draft_model.logits(tokens + draft), params, tokens + draft))
                    draft.append(int(draft_rng.choice(model.vocab, p=q[-1])))
            accepted, token = rule(draft, model.rows(tokens, draft), params, rng,
                                   draft_probs=np.array(q) if drafter == "sampled" else None, history=tokens)
            if stats is not None:
                stats.observe(len(draft), len(accepted))
            tokens += accepted + [token]
        counts[tokens[len(prompt)], tokens[len(prompt) + 1]] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of the counts against the probabilities, the cells expected fewer than 5 times pooled into
    one (the chi-square approximation needs about 5 per cell)."""
    expected = probs.ravel() * counts.sum()
    observed = counts.ravel()
    assert observed[expected == 0].sum() == 0  # a pair the filters exclude was never produced
    rare = expected < 5
    expected = np.append(expected[~rare], expected[rare].sum())
    observed = np.append(observed[~rare], observed[rare].sum())
    stat = float(((observed - expected) ** 2 / np.maximum(expected, 1e-300)).sum())
    return chi2_sf(stat, len(expected) - 1)


def accept_always(draft, target_logits, params, rng, draft_probs=None, history=None):
    """A wrong rule: keep the whole draft, then sample the next token from the target."""
    accepted, token = verify([], target_logits[len(draft):], params, rng, history=list(history) + list(draft))
    return list(draft), token


def residual_is_p(draft, target_logits, params, rng, draft_probs=None, history=None):
    """A subtly wrong rule: after a rejection draw from p itself instead of norm(max(0, p - q))."""
    accepted, token = verify(draft, target_logits, params, rng, draft_probs, history)
    if len(accepted) == len(draft):
        return accepted, token
    i = len(accepted)
    return accepted, verify([], target_logits[i:i + 1], params, rng, history=list(history) + draft[:i])[1]


DRAWS = 10000
SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.3},
    {"temperature": 1.2, "top_p": 0.8, "min_p": 0.05},
]


@pytest.mark.parametrize("drafter", ["point", "sampled"])
@pytest.mark.parametrize("options", SETTINGS)
def test_sampled_output_follows_the_target_distribution(options, drafter):
    model = TinyModel(8, seed=4, scale=2.5)
    params, prompt = Params(**options), [1, 5, 2]
    stats = SpecDecodeStats(3)
    counts = first_two_counts(model, prompt, params, DRAWS, 3, drafter, stats=stats)
    assert chi2_pvalue(counts, first_two_exact(model, prompt, params)) > 0.001
    assert min(stats.acceptance_rate_per_pos) > 0.15  # every position's acceptance path ran


def test_a_sampled_draft_verified_without_q_is_still_exact_but_accepts_less():
    """Drawing y from p and keeping the draft while y == x emits p's draws whatever the draft: exact for any
    draft, accepting with probability sum q p instead of the rejection rule's sum min(p, q)."""
    model = TinyModel(8, seed=4, scale=2.5)
    params, prompt = Params(temperature=1.0), [1, 5, 2]
    with_q, without_q = SpecDecodeStats(3), SpecDecodeStats(3)
    first_two_counts(model, prompt, params, DRAWS // 2, 3, "sampled", stats=with_q)
    counts = first_two_counts(model, prompt, params, DRAWS, 3, "sampled-without-q", stats=without_q)
    assert chi2_pvalue(counts, first_two_exact(model, prompt, params)) > 0.001
    assert without_q.acceptance_rate < 0.8 * with_q.acceptance_rate


@pytest.mark.parametrize("drafter, rule", [("point", accept_always), ("sampled", accept_always),
                                           ("sampled", residual_is_p)])
def test_the_chi_square_test_rejects_a_wrong_rule(drafter, rule):
    model = TinyModel(8, seed=4, scale=2.5)
    params, prompt = Params(temperature=1.0), [1, 5, 2]
    counts = first_two_counts(model, prompt, params, DRAWS, 3, drafter, rule)
    assert chi2_pvalue(counts, first_two_exact(model, prompt, params)) < 1e-6


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_fix():
    logits = np.zeros((3, 8), np.float32)
    sampled = Params(temperature=1.0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"expected \[2, vocab\]"):
        verify([1], logits, sampled, rng)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify([1, 8], logits, sampled, rng)
    with pytest.raises(ValueError, match="history=request.tokens"):
        verify([1, 2], logits, Params(repetition_penalty=1.2), None)
    with pytest.raises(ValueError, match="rng="):
        verify([1, 2], logits, sampled, None)
    with pytest.raises(ValueError, match=r"expected \[2, 8\]"):
        verify([1, 2], logits, sampled, rng, draft_probs=np.full((3, 8), 1 / 8))
    q = np.full((2, 8), 1 / 7)
    q[0, 1] = 0.0
    with pytest.raises(ValueError, match="probability 0"):
        verify([1, 2], logits, sampled, rng, draft_probs=q)


# -- metrics -----------------------------------------------------------------------------------------


def test_stats_count_as_vllm_does():
    stats = SpecDecodeStats(4)
    stats.observe(4, 2)
    stats.observe(4, 4)
    stats.observe(0, 0)  # nothing proposed: not a draft
    stats.observe(3, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 11, 6)
    assert stats.num_accepted_tokens_per_pos == [2, 2, 1, 1]
    assert stats.acceptance_rate == pytest.approx(6 / 11)
    assert stats.mean_acceptance_length == pytest.approx(3.0)
    assert stats.acceptance_rate_per_pos == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    other = SpecDecodeStats(4)
    other.observe(2, 1)
    stats.merge(other)
    assert (stats.num_drafts, stats.num_accepted_tokens_per_pos) == (4, [3, 2, 1, 1])
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(SpecDecodeStats(2))
    with pytest.raises(ValueError, match="num_spec_tokens"):
        SpecDecodeStats(0)
