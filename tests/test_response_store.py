"""The bounded in-memory store behind previous_response_id and GET/DELETE /v1/responses/{id}."""
from __future__ import annotations

import json

from fp8_turbo.engine.serving.response_store import ResponseStore


def response(i: int, text: str = "x") -> tuple[dict, list[dict]]:
    return {"id": f"resp_{i}", "output_text": text}, [{"role": "user", "content": text}]


def test_oldest_go_first_past_the_count():
    store = ResponseStore(max_responses=3, max_chars=1 << 20)
    for i in range(5):
        store.put(*response(i))
    assert len(store) == 3 and [store.get(f"resp_{i}") is None for i in range(5)] == [True, True, False, False, False]
    assert store.get("resp_4").conversation == [{"role": "user", "content": "x"}]


def test_oldest_go_first_past_the_characters_and_the_count_follows():
    body, conversation = response(0, "y" * 100)
    size = len(json.dumps(body)) + len(json.dumps(conversation))
    store = ResponseStore(max_responses=100, max_chars=3 * size)
    for i in range(5):
        store.put(*response(i, "y" * 100))
    assert len(store) == 3 and store.chars == 3 * size and store.get("resp_1") is None
    assert store.delete("resp_4") and not store.delete("resp_4") and store.chars == 2 * size
    store.put(*response(9, "z" * (4 * size)))  # larger than the whole store: not kept, nothing dropped for it
    assert store.get("resp_9") is None and len(store) == 2


def test_storing_an_id_again_replaces_it():
    store = ResponseStore(max_responses=2, max_chars=1 << 20)
    store.put(*response(1, "a"))
    store.put(*response(1, "bb"))
    assert len(store) == 1 and store.get("resp_1").body["output_text"] == "bb"
    assert store.chars == len(json.dumps(store.get("resp_1").body)) + len(json.dumps(store.get("resp_1").conversation))
