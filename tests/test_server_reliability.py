"""Many concurrent clients against one server: good requests (streaming and not), bad and hostile ones
(lone surrogates, deep nesting, n=1000, non-JSON content types), clients that leave early or hang up
right after sending. The queue is kept small, so good requests may also get a 503 with Retry-After.
Expect 0 unexpected status codes, a complete answer for every good request that was admitted, and
afterwards an idle engine (0 KV blocks in use, 0 running) read from /metrics.

The default is the issue's 500 requests from 64 clients (about 11 s with the tiny model on 2 shared
cores); FP8_TURBO_RELIABILITY_REQUESTS / FP8_TURBO_RELIABILITY_CLIENTS scale it.
"""
from __future__ import annotations

import asyncio
import json
import os
import random

import httpx
import pytest

from fp8_turbo.engine.serving.limits import ServerLimits
from server_fixture import SEED_MODEL_NAME as MODEL, start_server, tiny_engine

NUM_REQUESTS = int(os.environ.get("FP8_TURBO_RELIABILITY_REQUESTS", "500"))
NUM_CLIENTS = int(os.environ.get("FP8_TURBO_RELIABILITY_CLIENTS", "64"))
QUEUE = 16  # sequences waiting before a 503: small, so that 64 clients meet it now and then
POISON = [7, 7, 7, 7]  # a prompt holding these ids makes the sampler raise (an exception inside one request)


class PoisonedSampler:
    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, logits, rows):
        for row in rows:
            ids = list(row.prompt_token_ids)
            if any(ids[i:i + len(POISON)] == POISON for i in range(len(ids) - len(POISON) + 1)):
                raise RuntimeError("poisoned prompt")
        return self.sampler(logits, rows)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_engine(tmp_path_factory.mktemp("ck"))
    engine.sampler = PoisonedSampler(engine.sampler)
    s = start_server(engine, limits=ServerLimits(max_num_waiting=QUEUE))
    yield s
    s.__exit__()


def _messages(rng: random.Random) -> list[dict]:
    words = " ".join(f"w{rng.randrange(3, 384)}" for _ in range(rng.randrange(1, 40)))
    return [{"role": "user", "content": words}]


BAD_BODIES = [
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "temperature": 5}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "top_k": -3}, 400),
    ({"model": MODEL, "messages": [{"role": "bot", "content": "w5"}]}, 400),
    ({"model": MODEL, "messages": []}, 400),
    ({"model": "other-model", "messages": [{"role": "user", "content": "w5"}]}, 404),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5 " * 600}]}, 400),  # past max_model_len
    (b'{"model": "x", "messages": [', 400),
    (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "w5 \\ud800"}]}', 400),
    (b'{"model": "\\udfff", "messages": []}', 400),
    (b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "n": 1000}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "logit_bias": {"100000": 1}}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": -5}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "stop": ["w9"] * 17}, 400),
    ("text/plain", 415),  # a cross-origin "simple" POST
    # JSON texts inside the body, parsed again (issue 25): nested past Python's recursion limit, a lone surrogate
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 2000 + "]" * 2000}}]}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}]}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}],
      "structured_outputs": {"json": '{"a": ' * 2000 + "1" + "}" * 2000}}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "min_tokens": 1_000_000}, 400),
]
OVERLOADED = "overloaded"  # a good request answered 503 + Retry-After: expected, the queue is small


async def _one(http: httpx.AsyncClient, i: int) -> str | None:
    """Run request i; return a description of what went wrong, or None."""
    rng = random.Random(i)
    kind = i % 6
    url = "/v1/chat/completions"
    if kind == 0:  # plain chat
        max_tokens = rng.randrange(1, 24)
        r = await http.post(url, json={"model": MODEL, "messages": _messages(rng), "max_tokens": max_tokens,
                                       "temperature": rng.choice([0, 0.8]), "seed": i})
        if _overloaded(r):
            return OVERLOADED
        if r.status_code != 200:
            return f"{i}: chat {r.status_code} {r.text[:200]}"
        body = r.json()
        c, u = body["choices"][0], body["usage"]
        if c["finish_reason"] not in ("stop", "length") or not isinstance(c["message"]["content"], str):
            return f"{i}: incomplete chat {body}"
        if c["finish_reason"] == "length" and u["completion_tokens"] != max_tokens:
            return f"{i}: length finish after {u['completion_tokens']} of {max_tokens} tokens"
    elif kind in (1, 4):  # streaming chat; kind 4 leaves after two events
        body = {"model": MODEL, "messages": _messages(rng), "stream": True, "max_tokens": rng.randrange(1, 32),
                "stream_options": {"include_usage": True}}
        if kind == 4:
            body.update(max_tokens=300, ignore_eos=True)
        async with http.stream("POST", url, json=body) as r:
            if _overloaded(r):
                await r.aread()
                return OVERLOADED
            if r.status_code != 200:
                return f"{i}: stream {r.status_code}"
            events = []
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
                    if kind == 4 and len(events) == 2:
                        return None  # leave: the server must abort and free the blocks
        if events[-1] != "data: [DONE]":
            return f"{i}: stream did not end with [DONE]: {events[-3:]}"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        if finishes[-1] not in ("stop", "length") or "usage" not in chunks[-1]:
            return f"{i}: incomplete stream {chunks[-2:]}"
    elif kind == 2:  # bad input
        body, status = BAD_BODIES[(i // 6) % len(BAD_BODIES)]
        if body == "text/plain":
            r = await http.post(url, content=json.dumps(_messages(rng)), headers={"content-type": body})
        elif isinstance(body, bytes):
            r = await http.post(url, content=body, headers={"content-type": "application/json"})
        else:
            r = await http.post(url, json=body)
        if r.status_code != status or set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
            return f"{i}: bad input answered {r.status_code} {r.text[:200]}"
    elif kind == 3:  # text completion with echo + logprobs
        ids = [rng.randrange(3, 384) for _ in range(rng.randrange(2, 30))]
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1,
                                                     "max_tokens": rng.randrange(0, 4)})
        if _overloaded(r):
            return OVERLOADED
        if r.status_code != 200:
            return f"{i}: completion {r.status_code} {r.text[:200]}"
        lp = r.json()["choices"][0]["logprobs"]
        if len(lp["token_logprobs"]) != len(ids) + r.json()["usage"]["completion_tokens"]:
            return f"{i}: echo logprobs length {len(lp['token_logprobs'])} for {len(ids)} prompt tokens"
    elif (i // 6) % 2:  # hang up right after sending a stream request: the server must release it
        _, writer = await asyncio.open_connection(http.base_url.host, http.base_url.port)
        body = json.dumps({"model": MODEL, "messages": _messages(rng), "stream": True, "max_tokens": 200,
                           "ignore_eos": True}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    else:  # health and metrics while under load
        if (await http.get("/health")).status_code != 200 or (await http.get("/metrics")).status_code != 200:
            return f"{i}: health/metrics failed"
    return None


def _overloaded(r: httpx.Response) -> bool:
    return r.status_code == 503 and r.headers.get("retry-after") == "1" and r.headers.get("x-request-id") is not None


async def _load(url: str, num_requests: int, num_clients: int) -> list[str]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    failures: list[str] = []
    overloaded: list[int] = []

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
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


def test_many_concurrent_clients(server):
    failures, overloaded = asyncio.run(_load(server.url, NUM_REQUESTS, NUM_CLIENTS))
    print(f"{NUM_REQUESTS} requests, {NUM_CLIENTS} clients: {len(overloaded)} answered 503 (queue of {QUEUE})")
    assert failures == []
    m = server.wait_idle()
    assert m["fp8_turbo_kv_cache_used_blocks"] == 0
    assert m["fp8_turbo_num_requests_running"] == 0 and m["fp8_turbo_num_requests_waiting"] == 0
    assert m["fp8_turbo_num_requests_in_flight"] == 0
    answered = {k: v for k, v in m.items() if k.startswith("fp8_turbo_requests_total")}
    assert not any('status="50' in k and 'status="503"' not in k for k in answered), answered
    hung_up = sum(1 for i in range(NUM_REQUESTS) if i % 6 == 5 and (i // 6) % 2)
    # 503s only for a full queue: the good requests told so, and hang-ups that met it too.
    assert len(overloaded) <= sum(v for k, v in answered.items() if 'status="503"' in k) <= len(overloaded) + hung_up
    # Every stream left early is counted; a hang-up is counted when its stream had started.
    left = sum(1 for i in range(NUM_REQUESTS) if i % 6 == 4 and i not in overloaded)
    assert left <= m["fp8_turbo_requests_aborted_total"] <= left + hung_up


def test_exception_in_one_request_fails_only_that_request(server):
    poisoned = {"model": MODEL, "prompt": POISON, "max_tokens": 4}
    r = httpx.post(f"{server.url}/v1/completions", json=poisoned, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    # A generic message carrying the request id (the exception is in the server's log, not the answer).
    assert r.headers["x-request-id"] in r.json()["error"]["message"] and "poisoned" not in r.text
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "w7 w7 w7 w7 w7"}], "stream": True}) as s:
        raw = s.read().decode()
    assert '"error"' in raw and raw.endswith("data: [DONE]\n\n") and "poisoned" not in raw
    assert s.headers["x-request-id"] in raw
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.wait_idle()["fp8_turbo_kv_cache_used_blocks"] == 0
