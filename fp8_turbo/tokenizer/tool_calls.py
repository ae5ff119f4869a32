"""Parse Llama 3.x tool-call output into OpenAI-style tool calls.

Llama 3.x models call custom tools by answering with JSON objects
`{"name": "get_weather", "parameters": {"city": "Paris"}}` ("arguments" is accepted too), optionally
after `<|python_tag|>`, several separated by ";" or newlines, or as one JSON list; some models wrap
them in a ```json fence. Anything else -- prose, prose around JSON, malformed JSON, JSON that is not
a call -- is not a tool call, and stays content.

`call_schema` is the same form as a JSON Schema, for grammars that make the model call a tool.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

PYTHON_TAG = "<|python_tag|>"
_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")


def new_tool_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's form)
    id: str = field(default_factory=new_tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema of one call, in the form above, to one of `functions` (OpenAI function definitions:
    {"name", "description", "parameters"}), its arguments following the function's parameters schema
    (a function without one takes no arguments)."""
    options = []
    for function in functions:
        parameters = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "parameters": parameters},
                        "required": ["name", "parameters"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The tool calls `text` consists of, or None when it is not (only) tool calls."""
    body = _strip_wrapping(text)
    if not body.startswith(("{", "[")):
        return None
    objects = _json_values(body)
    if objects is None:
        return None
    if len(objects) == 1 and isinstance(objects[0], list):
        objects = objects[0]
    calls = [_as_call(obj) for obj in objects]
    if not calls or any(call is None for call in calls):
        return None
    return calls


def _strip_wrapping(text: str) -> str:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    for end in _END_TOKENS:
        body = body.removesuffix(end).rstrip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3].strip()
        body = body.removeprefix("json").strip()
    return body


def _json_values(body: str) -> list[Any] | None:
    """Consecutive JSON values separated by whitespace or ";", or None if anything else is in between."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        try:
            value, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)
        end = pos
        pos = _skip(body, pos, " \t\r\n")
        if pos == len(body):
            return values
        if body[pos] == ";":
            pos = _skip(body, pos + 1, " \t\r\n")
            if pos == len(body):  # a trailing ";"
                return values
        elif "\n" not in body[end:pos]:  # values on one line need a ";" between them
            return None


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _as_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:  # OpenAI's {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(arguments, str):  # already a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))
