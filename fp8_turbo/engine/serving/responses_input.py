"""A Responses API request in the terms of chat completions, so both run the same path (template,
grammar, sampling, tool-call parsing):

- `input`: a string (one user message) or items: messages (role user, system, developer or
  assistant; content a string or text parts: input_text, output_text, refusal), `function_call`
  (an assistant's call: name, arguments, call_id) and `function_call_output` (its result, by
  call_id). Consecutive calls join the assistant message before them, as chat's `tool_calls`.
- `instructions`: a system message in front (not carried over by previous_response_id, as OpenAI).
- `tools`: flat function tools {"type": "function", "name", "parameters", ...}; `tool_choice`
  none / auto / required / {"type": "function", "name"}; `text.format` text / json_object /
  json_schema {"name", "schema", "strict"}.

Everything else OpenAI defines that this server does not do (images and files in input, hosted
tools, reasoning, background runs, ...) is a 400 naming the field; errors from the chat path are
renamed to the Responses fields (`response_format.json_schema.schema` -> `text.format.schema`).
"""
from __future__ import annotations

import re
from typing import Any

from fp8_turbo.engine.serving.body import parse_json_text
from fp8_turbo.engine.serving.protocol import APIError, ChatCompletionRequest, ResponseFormat, ResponsesRequest

ITEM_TYPES = ("message", "function_call", "function_call_output")
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
_ROLES = ("user", "system", "developer", "assistant")

# OpenAI fields this server does not implement: a 400 when set to anything but null/false/empty.
UNSUPPORTED_FIELDS = {
    "background": "responses run in the foreground here",
    "conversation": "conversations are not kept here; pass previous_response_id or the whole input",
    "prompt": "stored prompt templates are not kept here",
    "reasoning": "this model has no separate reasoning",
    "max_tool_calls": "use parallel_tool_calls false for at most one call",
    "context_management": "the context is not compacted here",
    "moderation": "there is no moderation model here",
    "background_options": "responses run in the foreground here",
}
# Chat completions' names sent to /v1/responses by mistake.
CHAT_FIELDS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format", "messages": "input"}


def check_fields(req: ResponsesRequest) -> None:
    extra = req.model_extra or {}
    for name, why in UNSUPPORTED_FIELDS.items():
        if extra.get(name) not in (None, False, {}, []):
            raise APIError(400, f"{name} is not supported by this server: {why}", param=name,
                           code="unsupported_parameter")
    for name, instead in CHAT_FIELDS.items():
        if extra.get(name) is not None or (name == "max_tokens" and req.max_tokens is not None):
            raise APIError(400, f"{name} is not a Responses API field: use {instead}", param=name,
                           code="unknown_parameter")
    if req.n != 1:
        raise APIError(400, f"n is not a Responses API field (one answer per response), got {req.n}", param="n",
                       code="unknown_parameter")
    if req.truncation == "auto":
        raise APIError(400, "truncation 'auto' is not supported: an input longer than the context is a 400",
                       param="truncation", code="unsupported_value")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise APIError(400, f"text.verbosity {req.text.verbosity!r} is not supported (only 'medium')",
                       param="text.verbosity", code="unsupported_value")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be an integer in [0, 20], got {req.top_logprobs}",
                       param="top_logprobs", code="invalid_value")


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat request that answers `req` after the `history` of previous_response_id (chat messages),
    and the conversation without instructions (what the store keeps for the next turn)."""
    conversation = history + input_messages(req.input, history)
    system = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    messages = system + conversation
    chat = ChatCompletionRequest.model_construct(
        messages=messages, tools=chat_tools(req.tools), tool_choice=chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls, response_format=response_format(req),
        structured_outputs=req.structured_outputs)
    return chat, conversation


def input_messages(input: str | list[Any], history: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    if not input and not history:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    names = {c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls") or []}
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object (a message or a function call item), got "
                                f"{type(item).__name__}", param=where, code="invalid_value")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            names[call["id"]] = call["function"]["name"]
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn: one assistant message
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            message = {"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), f"{where}.output")}
            if call_id in names:
                message["name"] = names[call_id]
            messages.append(message)
        else:
            raise APIError(400, f"{where}.type {kind!r} is not supported (this server takes "
                                f"{', '.join(ITEM_TYPES)})", param=f"{where}.type", code="unsupported_value")
    return messages


def _message(item: dict, where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r:.40}", param=f"{where}.role",
                       code="invalid_value")
    return {"role": role, "content": _text(item.get("content"), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    """A string, or text parts joined; an image, file or audio part is a 400 (the model reads text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text parts, got {type(content).__name__}",
                       param=where, code="invalid_value")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = _TEXT_PARTS.get(kind)
        if key is None:
            raise APIError(400, f"{where}[{j}]: type {kind!r:.40} is not supported: this model reads text "
                                f"({', '.join(_TEXT_PARTS)} parts)", param=f"{where}[{j}].type",
                           code="unsupported_value")
        if not isinstance(part.get(key), str):
            raise APIError(400, f"{where}[{j}].{key} must be a string", param=f"{where}[{j}].{key}",
                           code="invalid_value")
        texts.append(part[key])
    return "".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{where}.{key} must be a non-empty string", param=f"{where}.{key}",
                       code="missing_required_parameter" if value is None else "invalid_value")
    return value


def _function_call(item: dict, where: str) -> dict[str, Any]:
    name, call_id = _string(item, "name", where), _string(item, "call_id", where)
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        raise APIError(400, f"{where}.arguments must be a string (a JSON object)", param=f"{where}.arguments",
                       code="invalid_value")
    parsed = parse_json_text(arguments, f"{where}.arguments") if arguments.strip() else {}
    if not isinstance(parsed, dict):
        raise APIError(400, f"{where}.arguments must be a JSON object, got {type(parsed).__name__}",
                       param=f"{where}.arguments", code="invalid_value")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}


def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Flat function tools as chat tools ({"type": "function", "function": {...}})."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools[{i}].type {kind!r:.40} is not supported: this server calls function tools "
                                f"only", param=f"tools[{i}].type", code="unsupported_value")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise APIError(400, f"tools[{i}].name must be a non-empty string", param=f"tools[{i}].name",
                           code="invalid_value")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'name': ...}}, "
                            f"got {choice!r:.100}", param="tool_choice", code="unsupported_value")
    return choice


def response_format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else ResponseFormat.model_construct(type=fmt.type, json_schema=None)
    if fmt.schema_ is None:
        raise APIError(400, "text.format.schema is required for type 'json_schema'", param="text.format.schema",
                       code="missing_required_parameter")
    return ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
        "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}})


_RENAMES = [  # chat completions' field names -> the Responses API's, in errors
    (re.compile(r"response_format\.json_schema\.(\w+)"), r"text.format.\1"),
    (re.compile(r"response_format"), "text.format"),
    (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"messages(\[\d+\])?(\.\w+)*"), "input"),
]


def responses_error(e: APIError) -> APIError:
    """`e` with chat completions' field names (param and message) in the Responses API's terms."""
    for pattern, name in _RENAMES:
        if e.param and pattern.match(e.param):
            e.param = pattern.sub(name, e.param, count=1)
            e.message = pattern.sub(name, e.message)
            break
    return e
