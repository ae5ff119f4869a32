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
    (a function without one takes no arguments).

    Each parameters schema moves inside the call's schema, so its local references (`#`, `#/$defs/City`
    as pydantic writes them, any `#/...` pointer) are rewritten to point where it now sits
    (`#/properties/parameters/$defs/City`, or `#/anyOf/1/properties/parameters/...` for the second of
    several functions): each function keeps its own `$defs`, so two tools' `City` never collide.
    """
    options = []
    for i, function in enumerate(functions):
        parameters = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        base = "/properties/parameters" if len(functions) == 1 else f"/anyOf/{i}/properties/parameters"
        properties = {"name": {"const": function["name"]}, "parameters": relocate_refs(parameters, base)}
        options.append({"type": "object", "properties": properties, "required": ["name", "parameters"],
                        "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


# In a schema, the values of these keywords are data (a "$ref" key inside them is no reference), and
# those of the next maps of names to schemas (a property may be called "default" or "$ref").
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def relocate_refs(schema: Any, base: str) -> Any:
    """A copy of `schema` with every local JSON-pointer `$ref` ("#" or "#/...") prefixed by `base` (a
    JSON pointer, "/properties/parameters"), for `schema` placed at `base` inside another document.
    Other references (anchors "#name", URLs) are left as they are. Iterative: deep schemas cannot
    exhaust the stack."""
    stack: list[tuple[Any, Any, bool]] = []  # (source, its copy, whether source is a map of names to schemas)

    def copy_of(value: Any, names: bool = False) -> Any:
        if isinstance(value, (dict, list)):
            out: Any = {} if isinstance(value, dict) else [None] * len(value)
            stack.append((value, out, names))
            return out
        return value

    root = copy_of(schema)
    while stack:
        source, target, names = stack.pop()
        if isinstance(source, list):
            for j, value in enumerate(source):
                target[j] = copy_of(value)
            continue
        for key, value in source.items():
            if names:
                target[key] = copy_of(value)
            elif key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
                target[key] = "#" + base + value[1:]
            elif key in _DATA_KEYWORDS:
                target[key] = value
            else:
                target[key] = copy_of(value, names=key in _NAME_MAPS)
    return root


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
        except (ValueError, RecursionError):  # not JSON, an integer of over 4300 digits, nested too deep
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
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    try:
        text = json.dumps(arguments, ensure_ascii=False)
        (name + text).encode("utf-8")  # a "\ud800" escape decodes to a lone surrogate: no call, the text stays content
    except (ValueError, RecursionError):  # (UnicodeEncodeError is a ValueError)
        return None
    return ToolCall(name=name, arguments=text)
