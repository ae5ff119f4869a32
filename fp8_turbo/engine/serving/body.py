"""Reading a request body as JSON, refusing what is hostile with a 4xx before anything else sees it.

415 for a Content-Type that is not JSON (a web page's cross-origin "simple" POST is text/plain or a
form, so it never reaches a handler), 413 past the size limit, 408 for a body that takes too long,
400 for what is not a JSON object, is nested too deep, or holds text that is not valid Unicode (a
lone surrogate such as "\\ud800" parses as JSON but breaks the tokenizer and the response encoder).
Big bodies are parsed in a worker thread, so a 4 MB body does not hold up the event loop.

JSON texts inside the body -- a schema given as a string, the arguments of a tool call in the
conversation -- are parsed again; `parse_json_text` does it with the same checks (a 400 naming the
field, never a RecursionError or a lone surrogate set loose), and `check_message_json` runs it over
the messages' tool calls.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request

from fp8_turbo.engine.serving.limits import MAX_JSON_DEPTH
from fp8_turbo.engine.serving.protocol import APIError

_PARSE_IN_THREAD_BYTES = 64 << 10


def check_content_type(request: Request) -> None:
    value = request.headers.get("content-type", "")
    mime = value.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise APIError(415, f"Content-Type must be application/json, got {value[:100]!r}",
                       code="unsupported_media_type")


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > max_bytes
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size, too_large
        async for chunk in request.stream():
            size += len(chunk)
            too_large = too_large or size > max_bytes
            if not too_large:
                chunks.append(chunk)
            # An oversized body is read to its end (and dropped) so the client gets the 413, not a reset.

    try:
        await asyncio.wait_for(read(), timeout)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection", code="client_closed") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    if too_large:
        raise APIError(413, f"the request body has {max(size, int(declared or 0))} bytes; the limit is {max_bytes}",
                       code="request_too_large")
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a dict, or a 400 naming what is wrong and where."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    _check_tree(body)
    return body


def parse_json_text(text: str, param: str) -> Any:
    """A JSON text found inside the body, parsed with the body's checks: a 400 naming `param` when it is
    not JSON, is nested more than MAX_JSON_DEPTH levels or holds text that is not valid Unicode."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise APIError(400, f"{param} is nested more than {MAX_JSON_DEPTH} levels deep", param=param,
                       code="invalid_value") from None
    except ValueError as e:
        raise APIError(400, f"{param} is not valid JSON: {e}", param=param, code="invalid_value") from None
    _check_tree(value, param)
    return value


def check_message_json(messages: Any) -> None:
    """The JSON texts of a conversation (`messages[i].tool_calls[j].function.arguments`) through
    parse_json_text, before the chat template parses them again."""
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for j, call in enumerate(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str) and arguments.strip():
                parse_json_text(arguments, f"messages[{i}].tool_calls[{j}].function.arguments")


def _check_tree(root: Any, root_path: str = "") -> None:
    """Depth and Unicode of every value and key, iteratively (no recursion on hostile input)."""
    stack: list[tuple[Any, str, int]] = [(root, root_path, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"{_param(path) or 'the request body'} is nested more than {MAX_JSON_DEPTH} "
                                    f"levels deep", param=_param(path), code="invalid_value")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, path)
                    stack.append((item, f"{path}.{key}" if path else key, depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end].encode("unicode_escape").decode("ascii")
        raise APIError(400, f"{_param(path) or 'a key'} holds a lone surrogate ({bad}) at character {e.start}: "
                            f"text must be valid Unicode", param=_param(path), code="invalid_value") from None


def _param(path: str) -> str | None:
    """A JSON path as an error's param: ASCII (keys may hold anything) and short."""
    return path.encode("ascii", "backslashreplace").decode()[:200] or None


async def read_json(request: Request, max_bytes: int, timeout: float,
                    run_blocking: Callable[..., Awaitable[Any]]) -> dict[str, Any]:
    """Content-Type, size, time, then parse (in `run_blocking`'s thread when big)."""
    check_content_type(request)
    raw = await read_body(request, max_bytes, timeout)
    if len(raw) > _PARSE_IN_THREAD_BYTES:
        return await run_blocking(parse_json_object, raw)
    return parse_json_object(raw)


def parse_json_text(text: str, param: str) -> Any:
    """A JSON text inside the body (a tool call's arguments) parsed with the same checks as the body,
    its 400s naming `param` ("input[2].arguments") and the path below it."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise APIError(400, f"{param} is nested more than {MAX_JSON_DEPTH} levels deep", param=param,
                       code="invalid_value") from None
    except ValueError as e:
        raise APIError(400, f"{param} is not valid JSON: {e}", param=param, code="invalid_value") from None
    _check_tree({param: value})
    return value
