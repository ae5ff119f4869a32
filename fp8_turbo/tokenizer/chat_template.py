"""Chat messages: validation, normalization for Jinja chat templates, and the built-in Llama 3.x template.

Messages arrive in OpenAI form. Templates expect something slightly different: content as a string
(never None), and a tool call's arguments as a dict (they `tojson` them), so `normalize_messages`
converts. A template that ignores tools or tool calls (SmolLM2's does) would silently drop them;
`inline_tool_calls` and `add_tools_system_prompt` put them in the text instead, in the same Llama 3.x
JSON form the model is asked to answer with (and `parse_tool_calls` reads).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system

# How the model is asked to call tools: the Llama 3.x JSON form that `parse_tool_calls` reads.
TOOL_INSTRUCTIONS = (
    "You have access to the following functions. To call a function, respond with JSON of the form "
    '{"name": function name, "parameters": dictionary of argument name and its value}. '
    'To call several, separate them with "; ". Do not use variables.'
)

# Llama 3.x prompt format (Meta's documented layout): a system block with the knowledge-cutoff header,
# tool definitions in the system block, tool calls as JSON objects, tool results under the `ipython`
# role. Used when a checkpoint ships no chat template. `date_string` can be passed as a render kwarg.
LLAMA3_CHAT_TEMPLATE = r"""
{{- bos_token }}
{%- if date_string is not defined %}{% set date_string = "26 Jul 2024" %}{% endif %}
{%- if messages and messages[0].role == "system" %}
    {%- set system_text = messages[0].content | trim %}
    {%- set conversation = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
    {%- set conversation = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools %}{{ "Environment: ipython\n" }}{% endif %}
{{- "Cutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n" }}
{%- if tools %}
    {{- TOOL_INSTRUCTIONS + "\n\n" }}
    {%- for tool in tools %}{{ tool | tojson(indent=4) + "\n\n" }}{% endfor %}
{%- endif %}
{{- system_text + "<|eot_id|>" }}
{%- for message in conversation %}
    {%- if message.role == "tool" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
    {%- elif message.role == "assistant" and message.tool_calls %}
        {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
        {%- if message.content %}{{ message.content | trim + "\n" }}{% endif %}
        {%- for call in message.tool_calls %}
            {%- if not loop.first %}{{ "; " }}{% endif %}
            {{- {"name": call.function.name, "parameters": call.function.arguments} | tojson }}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" + message.content | trim + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ "<|start_header_id|>assistant<|end_header_id|>\n\n" }}{% endif %}
""".replace("TOOL_INSTRUCTIONS", json.dumps(TOOL_INSTRUCTIONS))  # as a Jinja string literal


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of OpenAI-style messages, shaped for Jinja chat templates.

    Raises ValueError naming the message index and the field for any malformed message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
    out = dict(message)
    if role == "developer":
        out["role"] = role = "system"
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise ValueError(f"{where}.tool_calls is only allowed on assistant messages, not {role!r}")
        out["tool_calls"] = _normalize_tool_calls(where, tool_calls)
    content = message.get("content")
    if content is None and not (role == "assistant" and tool_calls):
        raise ValueError(f"{where}.content is required for role {role!r}")
    out["content"] = _content_text(where, content)
    if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
        raise ValueError(f"{where}.tool_call_id must be a string, got {type(message['tool_call_id']).__name__}")
    if "name" in message and not isinstance(message["name"], str):
        raise ValueError(f"{where}.name must be a string, got {type(message['name']).__name__}")
    return out


def _content_text(where: str, content: Any) -> str:
    """A message's content as one string: None -> "", a list of text parts -> their concatenation."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}; got {part!r:.80}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def _normalize_tool_calls(where: str, tool_calls: Any) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls must be a list, got {type(tool_calls).__name__}")
    calls = []
    for j, call in enumerate(tool_calls):
        field = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{field} must be {{'type': 'function', 'function': {{'name': str, 'arguments': str}}}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"{field}.function.arguments is not valid JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{field}.function.arguments must be a JSON object, got {type(arguments).__name__}")
        calls.append({**call, "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def normalize_tools(tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI tool definitions ({"type": "function", "function": {...}}); a bare function dict is wrapped."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ValueError(f"tools must be a list of dicts, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}].function.name must be a string")
        out.append({"type": "function", "function": function})
    return out


def format_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """Normalized tool calls in the Llama 3.x JSON form, separated by "; "."""
    return "; ".join(
        json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]}, ensure_ascii=False)
        for c in tool_calls
    )


def inline_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that ignore `tool_calls`: write an assistant's calls into its content."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = format_tool_calls(m["tool_calls"])
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{m['content']}\n{calls}" if m["content"] else calls
        out.append(m)
    return out


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Instructions offering `tools`, for templates that do not render tools themselves."""
    definitions = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return f"{TOOL_INSTRUCTIONS}\n\n{definitions}"


def add_tools_system_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append the tool instructions to a leading system message, or start with one that holds them."""
    prompt = tools_system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{first['content']}\n\n{prompt}" if first["content"] else prompt
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
