"""SamplingParams validation, and the LMDeploy/FastDeploy names."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from tristream import GenerationConfig, SamplingParams


def test_aliases_set_the_canonical_fields():
    p = SamplingParams(max_new_tokens=5, min_new_tokens=2, stop_words=["END"], random_seed=7)
    assert (p.max_tokens, p.min_tokens, p.stop, p.seed) == (5, 2, ["END"], 7)
    assert dataclasses.replace(p, seed=9).seed == 9
    assert pickle.loads(pickle.dumps(p)) == p


def test_an_alias_that_contradicts_its_field_is_an_error():
    with pytest.raises(ValueError, match="max_new_tokens=4 conflicts with max_tokens=3"):
        SamplingParams(max_tokens=3, max_new_tokens=4)
    assert SamplingParams(max_tokens=4, max_new_tokens=4).max_tokens == 4
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_new_tokens=0)


def test_generation_config_is_greedy_unless_do_sample():
    assert GenerationConfig(temperature=0.8, max_new_tokens=8).temperature == 0
    sampled = GenerationConfig(do_sample=True, temperature=0.8, top_k=40, random_seed=1)
    assert (sampled.temperature, sampled.top_k, sampled.seed) == (0.8, 40, 1)
    assert isinstance(sampled, SamplingParams)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "name", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
)
def test_every_float_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams(**{name: value})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: value})
