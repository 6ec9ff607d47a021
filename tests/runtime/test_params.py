"""SamplingParams, LoadOptions and ServeOptions: every bound is the table's, checked once, with a ParamError naming
the field and what it accepts; the CLI and the OpenAI protocol refuse what the table refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.params import LoadOptions, ParamError, SamplingParams
from runtime.sampling import make_sampler
from runtime.serving.options import ServeOptions


def outside(bound) -> list:
    """Values just past each of a numeric bound's limits, and values of the wrong type."""
    values = []
    if bound.ge is not None:
        values.append(bound.ge - 1 if bound.kind is int else bound.ge - 1e-3)
    if bound.gt is not None:
        values.append(bound.gt)
    if bound.le is not None:
        values.append(bound.le + 1 if bound.kind is int else bound.le + 1e-3)
    if bound.lt is not None:
        values.append(bound.lt)
    if bound.kind is bool:
        values += [1, "yes"]
    else:
        values += [True, "5"] if bound.kind is not str else [5, True]
    if bound.kind is float:
        values += [math.inf, math.nan]
    if bound.kind is int:
        values.append(2.5)
    if bound.choices:
        values.append("no-such-choice")
    return values


@pytest.mark.parametrize("table", [SamplingParams, LoadOptions, ServeOptions])
def test_every_field_refuses_what_its_bound_refuses_and_names_itself(table):
    checked = 0
    for name, (default, bound) in table.fields().items():
        table(**{name: default})  # the default is in range
        for value in outside(bound):
            with pytest.raises(ParamError) as refused:
                table(**{name: value})
            assert refused.value.param == name and str(refused.value).startswith(name)
            assert bound.accepts() in str(refused.value)  # and what would be accepted
            checked += 1
    assert checked >= 2 * len(table.fields())  # every field is tried


def test_messages_say_the_range_in_words():
    with pytest.raises(ParamError, match=r"temperature 3 is out of range; expected a number 0 <= x <= 2"):
        SamplingParams(temperature=3)
    with pytest.raises(ParamError, match=r"top_p 0 is out of range; expected a number 0 < x <= 1"):
        SamplingParams(top_p=0)
    with pytest.raises(ParamError, match=r"stop \('',\) must be up to 4 non-empty strings"):
        SamplingParams(stop=("",))
    with pytest.raises(ParamError, match="api_key '' would turn authentication off"):
        ServeOptions(api_key="")


def test_a_tiny_temperature_samples_greedily_instead_of_overflowing():
    """logits / 1e-40 overflow float32 to inf, and the softmax of infinities is NaN (it used to pick token 0)."""
    logits = np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32) * 10
    for temperature in (1e-40, 1e-6):
        sample = make_sampler(temperature=temperature, seed=0)
        assert (sample(logits) == logits.argmax(-1)).all()
    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(temperature=0.5).greedy


def test_transformers_arguments_become_params():
    greedy = SamplingParams.from_transformers(10, do_sample=False, temperature=0.7, top_k=5, stop_strings=["x"])
    assert (greedy.temperature, greedy.top_k, greedy.stop) == (0.0, 0, ("x",))
    sampled = SamplingParams.from_transformers(10, do_sample=True, temperature=0.7, top_k=5)
    assert (sampled.temperature, sampled.top_k) == (0.7, 5)
