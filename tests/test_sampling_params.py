"""SamplingParams validation: each out-of-range value raises ValueError naming field, value and range.

The ranges are the served API's (seed-api.txt), plus logprobs 0-20 from issue 5.
"""
from __future__ import annotations

import math

import pytest

from fp8_turbo.engine.sampling.params import SamplingParams

# (field, bad value, the range as the message writes it)
OUT_OF_RANGE = [
    ("temperature", -0.1, "[0.0, 2.0]"),
    ("temperature", 2.01, "[0.0, 2.0]"),
    ("temperature", math.nan, "[0.0, 2.0]"),
    ("temperature", "hot", "[0.0, 2.0]"),
    ("top_p", 0.0, "(0.0, 1.0]"),
    ("top_p", 1.5, "(0.0, 1.0]"),
    ("top_p", math.nan, "(0.0, 1.0]"),
    ("min_p", -0.01, "[0.0, 1.0]"),
    ("min_p", 1.01, "[0.0, 1.0]"),
    ("top_k", 1000, "[0, 1000)"),
    ("top_k", -2, "[0, 1000)"),
    ("top_k", 2.5, "[0, 1000)"),
    ("top_k", True, "[0, 1000)"),
    ("presence_penalty", -2.5, "[-2.0, 2.0]"),
    ("presence_penalty", 2.5, "[-2.0, 2.0]"),
    ("frequency_penalty", -2.01, "[-2.0, 2.0]"),
    ("frequency_penalty", math.inf, "[-2.0, 2.0]"),
    ("repetition_penalty", 0.0, "[0.01, 5.0]"),
    ("repetition_penalty", 5.5, "[0.01, 5.0]"),
    ("seed", -1, "[0, 2^63)"),
    ("seed", 2**63, "[0, 2^63)"),
    ("seed", 1.0, "[0, 2^63)"),
    ("max_tokens", -1, "[0, 1000000]"),
    ("max_tokens", 1_000_001, "[0, 1000000]"),
    ("logprobs", 21, "[0, 20]"),
    ("logprobs", -1, "[0, 20]"),
    ("prompt_logprobs", 21, "[0, 20]"),
    ("n", 0, ">= 1"),
    ("min_tokens", -1, ">= 0"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), OUT_OF_RANGE, ids=[f"{n}={v!r}" for n, v, _ in OUT_OF_RANGE])
def test_out_of_range_names_field_value_and_range(name, value, allowed):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{name: value})
    message = str(error.value)
    assert name in message and repr(value) in message and allowed in message, message


# The edges of each range are accepted.
EDGES = [
    ("temperature", 0.0), ("temperature", 2.0), ("top_p", 1.0), ("top_p", 1e-9), ("min_p", 0.0), ("min_p", 1.0),
    ("top_k", 0), ("top_k", 999), ("presence_penalty", -2.0), ("presence_penalty", 2.0),
    ("frequency_penalty", -2.0), ("frequency_penalty", 2.0), ("repetition_penalty", 0.01),
    ("repetition_penalty", 5.0), ("seed", 0), ("seed", 2**63 - 1), ("max_tokens", 0), ("max_tokens", 1_000_000),
    ("max_tokens", None), ("logprobs", 0), ("logprobs", 20), ("prompt_logprobs", 0),
]


@pytest.mark.parametrize(("name", "value"), EDGES, ids=[f"{n}={v!r}" for n, v in EDGES])
def test_range_edges_are_accepted(name, value):
    assert getattr(SamplingParams(**{name: value}), name) == value


def test_logit_bias_values_and_keys():
    with pytest.raises(ValueError, match=r"logit_bias\[5\] must be in \[-100.0, 100.0\], got 101.0"):
        SamplingParams(logit_bias={5: 101.0})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids >= 0, got -3"):
        SamplingParams(logit_bias={-3: 1.0})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids >= 0, got '7'"):
        SamplingParams(logit_bias={"7": 1.0})
    assert SamplingParams(logit_bias={5: -100.0, 6: 100.0}).logit_bias == {5: -100.0, 6: 100.0}


def test_stop_token_ids_and_min_tokens():
    with pytest.raises(ValueError, match="stop_token_ids must hold token ids >= 0, got -1"):
        SamplingParams(stop_token_ids=[2, -1])
    with pytest.raises(ValueError, match=r"min_tokens \(5\) must not exceed max_tokens \(4\)"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's spelling of "off"
    params = SamplingParams(stop="###")
    assert params.stop == ["###"] and params.stop_strings == ["###"]
    assert SamplingParams(stop=["", "x"]).stop_strings == ["x"]
    assert SamplingParams().stop_token_ids == []
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
