"""parse_tool_calls on Llama 3.x-style model outputs."""
from __future__ import annotations

import json
import re

import pytest

from fp8_turbo.tokenizer import ToolCall, parse_tool_calls


def _calls(text: str) -> list[tuple[str, dict]]:
    calls = parse_tool_calls(text)
    assert calls is not None, text
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_one_call():
    calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}')
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)


def test_arguments_key_and_string_arguments():
    assert _calls('{"name": "f", "arguments": {"x": 1}}') == [("f", {"x": 1})]
    assert _calls('{"name": "f", "arguments": "{\\"x\\": 1}"}') == [("f", {"x": 1})]
    assert _calls('{"name": "f"}') == [("f", {})]
    assert _calls('{"type": "function", "name": "f", "parameters": {}}') == [("f", {})]
    assert _calls('{"type": "function", "function": {"name": "f", "arguments": {"a": [1, 2]}}}') == [("f", {"a": [1, 2]})]


def test_several_calls():
    text = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "é"}}'
    assert _calls(text) == [("a", {"x": 1}), ("b", {"y": "é"})]
    assert _calls('{"name": "a", "parameters": {}};{"name": "b", "parameters": {}};') == [("a", {}), ("b", {})]
    assert _calls('{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {}}\n') == [("a", {}), ("b", {})]
    assert _calls('{"name": "a", "parameters": {}} \n  {"name": "b", "parameters": {}}') == [("a", {}), ("b", {})]
    assert _calls('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}]') == [("a", {}), ("b", {})]
    calls = parse_tool_calls(text)
    assert calls[0].id != calls[1].id


def test_python_tag_and_end_tokens():
    assert _calls('<|python_tag|>{"name": "search", "parameters": {"q": "fp8"}}') == [("search", {"q": "fp8"})]
    assert _calls('  <|python_tag|> {"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}<|eom_id|>\n') == \
        [("a", {}), ("b", {})]
    assert _calls('{"name": "a", "parameters": {}}<|eot_id|>') == [("a", {})]


def test_code_fence():
    assert _calls('```json\n{"name": "a", "parameters": {"n": 2}}\n```') == [("a", {"n": 2})]


def test_unicode_arguments_stay_readable():
    (call,) = parse_tool_calls('{"name": "translate", "parameters": {"text": "東京 🤗"}}')
    assert call.arguments == '{"text": "東京 🤗"}'


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The weather in Paris is sunny.",
        '{"name": "get_weather", "parameters": {"city": "Paris"}',  # truncated JSON
        '{"name": "get_weather", "parameters": {city: Paris}}',  # not JSON
        '{"name": "a", "parameters": {}} {"name": "b", "parameters": {}}',  # two on one line without ";"
        '{"name": "a", "parameters": {}}; and then some text',
        'Sure! {"name": "get_weather", "parameters": {"city": "Paris"}}',  # prose before JSON
        '{"name": "get_weather", "parameters": {"city": "Paris"}} is what I would call.',  # prose after JSON
        '{"city": "Paris"}',  # JSON without a name
        '{"name": 3, "parameters": {}}',
        '{"name": "", "parameters": {}}',
        '{"name": "f", "parameters": [1, 2]}',  # arguments not an object
        '{"name": "f", "arguments": "not json"}',
        "[]",
        '[1, 2]',
        '"just a string"',
        "<|python_tag|>print('hi')",  # Llama's code-interpreter form is not a JSON call
    ],
)
def test_not_a_tool_call_stays_content(text):
    assert parse_tool_calls(text) is None


def test_to_openai():
    call = ToolCall(name="f", arguments='{"a": 1}', id="call_x")
    assert call.to_openai() == {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"a": ' + "[" * 5000 + "]" * 5000 + "}}",  # past Python's recursion limit
    "[" * 100_000,
    '{"name": "f", "parameters": {"a": ' + "9" * 5000 + "}}",  # past the 4300-digit integer limit
    '{"name": "f", "parameters": "{\\"a\\": ' + "[" * 5000 + "]" * 5000 + '}"}',  # the same inside a string
    '{"name": "f", "parameters": {"a": "\\ud800"}}',  # an escape that decodes to a lone surrogate
    '{"name": "\\udfff", "parameters": {}}',
    '{"name": "f", "parameters": {"\\ud83d": 1}}',
])
def test_hostile_model_output_stays_content(text):
    """What a model (or a prompt steering it) may write that parses badly: never an exception (a 500 after
    the whole answer was generated) and never a call the response encoder cannot write."""
    assert parse_tool_calls(text) is None


def test_valid_escapes_still_make_calls():
    assert _calls('{"name": "f", "parameters": {"a": "\\ud83d\\ude00 \\u00e9"}}') == [("f", {"a": "\U0001F600 é"})]
