"""Samplers on hand-made distributions: each filter keeps exactly the tokens it should."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling import make_sampler, min_p_filter, top_k_filter, top_p_filter

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


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1.0}, "temperature -1.0 is out of range; expected >= 0"),
        ({"top_k": -3}, "top_k -3 is out of range"),
        ({"top_p": 0.0}, r"top_p 0.0 is out of range; expected 0 < top_p <= 1"),
        ({"top_p": 1.5}, "top_p 1.5 is out of range"),
        ({"min_p": 1.0}, r"min_p 1.0 is out of range; expected 0 <= min_p < 1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty 0.0 is out of range; expected > 0"),
    ],
)
def test_out_of_range_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**options)
