"""Every parameter range of the served API's page (seed-api.txt) is accepted at both ends, through the
official openai client against a real server (the tiny random Llama, max_model_len 512), and a
max_tokens above what the context leaves is clamped to it (finish_reason "length" at the context's end).
"""
from __future__ import annotations

import openai
import pytest

from server_fixture import SEED_MODEL_NAME, start_server, tiny_engine

MODEL = SEED_MODEL_NAME
MESSAGES = [{"role": "user", "content": "w5 w6 w7"}]

# The page's ranges: temperature [0, 2], top_p (0, 1], min_p [0, 1], top_k [0, 1000), max_tokens
# [0, 1000000], presence/frequency_penalty [-2, 2], repetition_penalty [0.01, 5], seed [0, 2^63)
# (the page prints 2^63 as the double 9223372036854776000).
EDGES = [
    ("temperature", 0.0), ("temperature", 2.0), ("top_p", 1e-9), ("top_p", 1.0), ("min_p", 0.0), ("min_p", 1.0),
    ("top_k", 0), ("top_k", 999), ("max_tokens", 0), ("max_tokens", 1_000_000), ("presence_penalty", -2.0),
    ("presence_penalty", 2.0), ("frequency_penalty", -2.0), ("frequency_penalty", 2.0),
    ("repetition_penalty", 0.01), ("repetition_penalty", 5.0), ("seed", 0), ("seed", 2**63 - 1),
    ("tool_choice", "none"), ("tool_choice", "auto"), ("user", "a1b2c3"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tiny_engine(tmp_path_factory.mktemp("ck")))
    yield s
    s.__exit__()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


SDK_FIELDS = {"temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty", "seed", "tool_choice",
              "user"}  # the others (vLLM's) travel in extra_body


@pytest.mark.parametrize("field, value", EDGES, ids=[f"{f}={v}" for f, v in EDGES])
def test_every_range_end_is_accepted(client, field, value):
    kw = {"max_tokens": 4}
    if field == "max_tokens" and value:
        kw["stop"] = ["w"]  # any word stops it: acceptance only here (the clamp: the next test)
    if field in SDK_FIELDS:
        kw[field] = value
    else:
        kw["extra_body"] = {field: value}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if field == "max_tokens" and value == 0:
        assert r.usage.completion_tokens == 0 and choice.message.content == "" and choice.finish_reason == "length"


def test_max_tokens_above_the_context_is_clamped(server, client):
    """max_tokens 1,000,000 (the page's maximum): generation runs to the end of the 512-token context."""
    limit = server.engine.max_model_len
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1_000_000, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == limit, (r.usage, limit)
    completion = client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=1_000_000, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens + completion.usage.completion_tokens == limit


def test_min_tokens_past_the_context_is_refused(client):
    """min_tokens promises tokens: one that cannot fit is a 400 naming the numbers, not a silent clamp."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1_000_000,
                                       extra_body={"min_tokens": 600})
    assert e.value.body["code"] == "context_length_exceeded" and "min_tokens is 600" in e.value.body["message"]
