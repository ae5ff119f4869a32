"""What a request asks the grammar engine for: `response_format`, `tool_choice` and vLLM's
`structured_outputs`, turned into one StructuredOutputsParams (or none), with 400s naming the field.

- response_format: text (nothing), json_object (any JSON object), json_schema (its `schema`).
- tool_choice: none (tools are not shown to the model), auto (shown; the answer may be calls),
  required (the answer is one or more calls to the tools, "; "-separated as the tool instructions
  ask; exactly one with parallel_tool_calls false), {"type": "function", "function": {"name"}}
  (one call to that function). Calls are the Llama 3.x JSON form `{"name", "parameters"}` with the
  arguments following the function's parameters schema (fp8_turbo/tokenizer/tool_calls.py), which
  may use `$defs`/`$ref` (recursive too) and `anyOf`, as pydantic writes them; a keyword the grammar
  engine cannot enforce is a 400 naming the tool and the keyword.
- structured_outputs (chat and completions): json, regex, choice, grammar or json_object.
Only one of the three may constrain a request; with response_format or structured_outputs the tools
are still shown, but the answer (held to that form) is never read as tool calls.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fp8_turbo.engine.sampling.params import StructuredOutputsParams
from fp8_turbo.engine.sampling.structured import GrammarError, json_sequence_grammar
from fp8_turbo.engine.serving.body import parse_json_text
from fp8_turbo.engine.serving.protocol import APIError, ChatCompletionRequest, ResponseFormat, _SamplingFields
from fp8_turbo.tokenizer.chat_template import normalize_tools
from fp8_turbo.tokenizer.tool_calls import ToolCall, call_schema, parse_tool_calls

TOOL_CALL_SEPARATOR = "; "  # as the tool instructions of fp8_turbo/tokenizer/chat_template.py ask
_TOOL_CALL_STARTS = ("{", "[", "<|python_tag|>", "```")  # text that may become a tool call is held back


@dataclass(slots=True)
class Structure:
    params: StructuredOutputsParams | None = None  # the grammar the output must follow
    param: str | None = None  # the request field it comes from, for errors ("response_format.json_schema.schema")
    tools: list[dict[str, Any]] | None = None  # tools to show the model
    parallel_tool_calls: bool = True
    functions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (index in tools, function) called

    def tool_calls(self, text: str) -> list[ToolCall] | None:
        """The calls `text` consists of when the request offered tools (only the first without parallel_tool_calls)."""
        if not self.parses_tool_calls:
            return None
        calls = parse_tool_calls(text)
        return calls[:1] if calls and not self.parallel_tool_calls else calls

    def grammar_error(self, e: GrammarError, compile: Callable[[StructuredOutputsParams], Any]) -> APIError:
        """A 400 for a grammar that does not compile. For tool calls, the first tool whose parameters do not
        compile by themselves is named with the problem (`Unimplemented keys: ["not"]`)."""
        for index, function in self.functions:
            try:
                compile(StructuredOutputsParams(json=call_schema([function])))
            except GrammarError as err:
                param = f"tools[{index}].function.parameters"
                return APIError(400, f"{param} (function {function['name']!r}): {err.detail}", param=param,
                                code="invalid_value")
        return APIError(400, f"{self.param}: {e.detail}", param=self.param, code="invalid_value")

    def failure(self, index: int, error: str | None) -> APIError:
        """A choice whose grammar failed while it was generated (finish_reason "error"): a 400 naming the
        field the grammar came from; the whole answer when every choice failed, else that choice's error."""
        param = self.param or "structured_outputs"
        return APIError(400, f"choice {index}: {param}: {error or 'the grammar failed'}", param=param,
                        code="grammar_error")

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the answer may be tool calls: tools are offered and no response_format or
        structured_outputs grammar holds the answer to its own form."""
        return self.tools is not None and (self.params is None or self.param == "tools")


def chat_structure(req: ChatCompletionRequest) -> Structure:
    tools = _tools(req.tools)
    parallel = req.parallel_tool_calls is not False
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    sources = [s for s in (_tool_choice(choice, tools, parallel), _response_format(req.response_format),
                           _structured_outputs(req)) if s is not None]
    if len(sources) > 1:
        raise APIError(400, "only one of tool_choice (required or a function), response_format (json_object or "
                            "json_schema) and structured_outputs may constrain the output",
                       param=sources[1].param.split(".", 1)[0], code="invalid_value")
    structure = sources[0] if sources else Structure()
    structure.tools = tools if choice != "none" else None
    structure.parallel_tool_calls = parallel
    return structure


def completion_structure(req: _SamplingFields) -> Structure:
    return _structured_outputs(req) or Structure()


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    try:
        tools = normalize_tools(tools)
    except ValueError as e:
        raise APIError(400, str(e), param="tools", code="invalid_value") from None
    for i, tool in enumerate(tools or []):
        parameters = tool["function"].get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object, got "
                                f"{type(parameters).__name__}", param=f"tools[{i}].function.parameters",
                           code="invalid_value")
    return tools or None


def _tool_choice(choice: str | dict, tools: list[dict[str, Any]] | None, parallel: bool) -> Structure | None:
    if choice in ("none", "auto"):
        return None
    if choice == "required":
        functions = [(i, t["function"]) for i, t in enumerate(tools or [])]
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        functions = [(i, t["function"]) for i, t in enumerate(tools or []) if t["function"]["name"] == name]
        if tools and not functions:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(t['function']['name'] for t in tools)})", param="tool_choice",
                           code="invalid_value")
        parallel = False
    else:
        raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or "
                            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r:.100}",
                       param="tool_choice", code="invalid_value")
    if not tools:
        raise APIError(400, f"tool_choice {choice!r:.100} needs tools", param="tool_choice", code="invalid_value")
    schema = call_schema([function for _, function in functions])
    if parallel:
        params = StructuredOutputsParams(grammar=json_sequence_grammar(schema, TOOL_CALL_SEPARATOR))
    else:
        params = StructuredOutputsParams(json=schema)
    return Structure(params, "tools", functions=functions)


def _response_format(response_format: ResponseFormat | None) -> Structure | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Structure(StructuredOutputsParams(json_object=True), "response_format")
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type 'json_schema'",
                       param="response_format.json_schema.schema", code="missing_required_parameter")
    return Structure(StructuredOutputsParams(json=spec.schema_), "response_format.json_schema.schema")


def _structured_outputs(req: _SamplingFields) -> Structure | None:
    if req.structured_outputs is None:
        return None
    if isinstance(req.structured_outputs.json_, str):  # a schema as text: parsed with the body's checks first
        parse_json_text(req.structured_outputs.json_, "structured_outputs.json")
    try:
        params = req.structured_outputs.params()
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0].rstrip(":"), code="invalid_value") from None
    return Structure(params, f"structured_outputs.{params.kind}")


def may_be_tool_call(text: str) -> bool:
    """Whether `text` is empty or begins like a tool call ("<|pyt" may still become "<|python_tag|>")."""
    head = text.lstrip()
    return any(head.startswith(start) or start.startswith(head) for start in _TOOL_CALL_STARTS)
