"""Responses kept in memory for `previous_response_id` and GET/DELETE /v1/responses/{id}.

Bounded: at most `max_responses` responses and `max_chars` characters of stored JSON (the response
object and the conversation it ended), the oldest dropped first; nothing survives a restart. A
response asked for with `"store": false` is not kept. Every stored response holds its whole
conversation (not a link to the previous one), so dropping one never breaks a later one.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_STORED_RESPONSES = 1024
MAX_STORED_CHARS = 64 << 20


@dataclass(slots=True)
class StoredResponse:
    body: dict[str, Any]  # the response object as answered
    conversation: list[dict[str, Any]]  # chat messages: its input (after the previous ones) and its output
    chars: int


class ResponseStore:
    def __init__(self, max_responses: int = MAX_STORED_RESPONSES, max_chars: int = MAX_STORED_CHARS):
        self.max_responses, self.max_chars = max_responses, max_chars
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self.chars = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        chars = len(json.dumps(body, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        if chars > self.max_chars:
            return  # larger than the whole store: not kept (previous_response_id to it is a 400)
        self.delete(body["id"])
        self._items[body["id"]] = StoredResponse(body, conversation, chars)
        self.chars += chars
        while len(self._items) > self.max_responses or self.chars > self.max_chars:
            _, dropped = self._items.popitem(last=False)
            self.chars -= dropped.chars

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self.chars -= stored.chars
        return stored is not None
