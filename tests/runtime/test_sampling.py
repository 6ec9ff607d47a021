"""Samplers on hand-made distributions: each filter keeps exactly the tokens it should."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling import (
    apply_repetition_penalty,
    candidates,
    categorical,
    make_sampler,
    min_p_filter,
    top_indices,
    top_k_filter,
    top_p_filter,
)

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 on tokens 3, 0, 4, 1, 2.
PROBS = np.array([[0.3, 0.1, 0.05, 0.4, 0.15]])
LOGITS = np.log(PROBS).astype(np.float32)


def kept(logits):
    return set(np.flatnonzero(np.isfinite(logits[0])).tolist())


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32)
    assert (make_sampler()(logits) == logits.argmax(-1)).all()


def test_top_k_keeps_the_k_most_likely():
    assert kept(top_k_filter(LOGITS.copy(), 2)) == {3, 0}
    assert kept(top_k_filter(LOGITS.copy(), 5)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("p, expected", [(0.4, {3}), (0.5, {3, 0}), (0.7, {3, 0}), (0.71, {3, 0, 4}), (0.9, {3, 0, 4, 1})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(LOGITS.copy(), p)) == expected


def test_min_p_scales_with_the_top_token():
    # min_p 0.3: threshold 0.12 -> tokens with p >= 0.12 are 3, 0, 4.
    assert kept(min_p_filter(LOGITS.copy(), 0.3)) == {3, 0, 4}
    assert kept(min_p_filter(LOGITS.copy(), 0.9)) == {3}


def test_repetition_penalty_lowers_seen_tokens():
    logits = np.array([[2.0, -1.0, 1.9]], np.float32)
    sample = make_sampler(repetition_penalty=2.0)
    assert sample(logits, np.array([[0]])).tolist() == [2]  # 2.0 / 2 < 1.9
    assert sample(logits, None).tolist() == [0]


def test_seed_makes_sampling_repeatable():
    logits = np.random.default_rng(1).normal(size=(2, 5000)).astype(np.float32)
    a = [make_sampler(temperature=1.0, seed=7)(logits).tolist() for _ in range(3)]
    first = make_sampler(temperature=1.0, seed=7)
    second = make_sampler(temperature=1.0, seed=7)
    assert [first(logits).tolist() for _ in range(5)] == [second(logits).tolist() for _ in range(5)]
    assert a[0] == a[1] == a[2]


def test_samples_follow_the_distribution():
    sample = make_sampler(temperature=1.0, seed=0)
    batch = np.repeat(LOGITS, 20000, axis=0)
    counts = np.bincount(sample(batch), minlength=5) / len(batch)
    # 20k draws: standard error <= 0.0035; 5 sigma.
    assert np.abs(counts - PROBS[0]).max() < 0.018
    top_k = np.bincount(make_sampler(temperature=1.0, top_k=2, seed=0)(batch), minlength=5) / len(batch)
    assert top_k[[1, 2, 4]].sum() == 0
    assert abs(top_k[3] - 0.4 / 0.7) < 0.02


def test_temperature_sharpens():
    batch = np.repeat(LOGITS, 20000, axis=0)
    cold = np.bincount(make_sampler(temperature=0.25, seed=0)(batch), minlength=5) / len(batch)
    assert cold[3] > 0.7


def reference_kept(logits, temperature, top_k, top_p, min_p):
    """The filters applied to whole rows, in transformers' order: what the sampler must keep."""
    scaled = logits / temperature
    scaled = min_p_filter(top_p_filter(top_k_filter(scaled, top_k), top_p), min_p)
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in scaled]


@pytest.mark.parametrize("vocab", [4096, 2**16])  # 2**16: long rows take the block-maximum search
@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 40, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 0.5, 0.0), (1.0, 0, 1.0, 0.05), (0.8, 64, 0.95, 0.02),
     (1.0, 0, 0.99, 0.1)],
)
def test_candidates_keep_what_the_whole_row_filters_keep(vocab, temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(vocab + top_k)
    logits = (rng.normal(size=(3, vocab)) * rng.uniform(2, 8, size=(3, 1))).astype(np.float32)
    idx, sub, log_total = candidates(logits, temperature, top_k, top_p, min_p)
    sub = min_p_filter(top_p_filter(top_k_filter(sub, top_k), top_p, log_total), min_p)
    kept_here = [set(i[np.isfinite(s)].tolist()) for i, s in zip(idx, sub)]
    assert kept_here == reference_kept(logits, temperature, top_k, top_p, min_p)


@pytest.mark.parametrize("m", [1, 7, 50, 300])
def test_top_indices_are_the_m_largest(m):
    logits = np.random.default_rng(m).normal(size=(2, 2**16)).astype(np.float32)
    expected = np.argsort(-logits, axis=-1)[:, :m]
    assert [set(r) for r in top_indices(logits, m).tolist()] == [set(r) for r in expected.tolist()]


def test_large_vocabulary_draws_follow_the_distribution():
    """The two-level draw over a 262144-entry row: five likely tokens spread over the row, the rest
    nearly impossible; 2000 draws."""
    vocab, hot = 262144, [3, 700, 5000, 100_000, 262_143]
    probs = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    logits = np.full((50, vocab), -40.0, np.float32)  # 50 rows at a time: 52 MB
    logits[:, hot] = np.log(probs)
    sample = make_sampler(temperature=1.0, seed=0)
    draws = np.concatenate([sample(logits) for _ in range(40)])
    assert set(draws.tolist()) <= set(hot)
    freq = np.array([(draws == h).mean() for h in hot])
    assert np.abs(freq - probs).max() < 5 * np.sqrt(0.25 / len(draws))  # 5 standard errors


def test_truncated_draws_stay_in_the_kept_set():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(64, 2**16)) * 4).astype(np.float32)
    for options in ({"top_k": 20}, {"top_p": 0.8}, {"min_p": 0.1}):
        sample = make_sampler(temperature=0.9, seed=1, **options)
        kept = reference_kept(logits, 0.9, options.get("top_k", 0), options.get("top_p", 1.0), options.get("min_p", 0.0))
        draws = sample(logits)
        assert all(int(d) in k for d, k in zip(draws, kept))


def test_categorical_never_draws_excluded_tokens():
    logits = np.array([[-np.inf, 0.0, -np.inf, 0.0], [5.0, -np.inf, -np.inf, -np.inf]], np.float32)
    rng = np.random.default_rng(0)
    draws = np.stack([categorical(logits, rng) for _ in range(500)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0}


def test_repetition_penalty_as_transformers():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 300)).astype(np.float32)
    history = rng.integers(0, 300, size=(2, 40))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits.copy(), history, 1.3), expected, rtol=1e-6)
