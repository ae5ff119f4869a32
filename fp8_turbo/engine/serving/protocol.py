"""The OpenAI wire format: request models (validated with pydantic), response builders and the error body.

Requests are parsed in strict mode ("0.5" is not a number, true is not an integer), unknown fields are
ignored as the OpenAI API does. Ranges are checked once, by `SamplingParams`, whose messages name the
field, the value and the allowed range; `to_sampling_params` turns a request into one.
"""
from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from fp8_turbo.engine.core.outputs import Logprob
from fp8_turbo.engine.sampling.params import SamplingParams, StructuredOutputsParams

Number = float  # strict mode still takes ints here (and refuses bools and strings)
_TYPE_TAGS = {"float", "int", "str", "bool", "list", "dict", "list[str]", "list[int]", "list[list[int]]", "none"}

API_KEY_ENV = "FP8_TURBO_API_KEY"
# Placeholder list prices in USD per million tokens for usage.estimated_cost (--price-input/--price-output).
DEFAULT_PRICE_INPUT_PER_M = 0.13
DEFAULT_PRICE_OUTPUT_PER_M = 0.40


class APIError(Exception):
    """An error answered as OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 503, Allow on a 405

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not
    description: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extra parameter (its fields are StructuredOutputsParams')."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def params(self) -> StructuredOutputsParams:
        """Raises ValueError naming the field when the combination is not one constraint."""
        return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar,
                                       json_object=self.json_object)


class _SamplingFields(_Request):
    """Fields shared by chat and text completions; defaults as in seed-api.txt."""

    model: str | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    min_p: Number = 0.0
    top_k: int = 0
    max_tokens: int | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    # vLLM extensions, accepted by name as many clients send them through extra_body.
    min_tokens: int = 0
    ignore_eos: bool = False
    logit_bias: dict[str, Number] | None = None
    stop_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputs | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Raises ValueError (naming field, value and range) for out-of-range values."""
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {sorted(self.logit_bias)[:5]}") from None
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured_outputs=structured_outputs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[Any]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for text completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


def _default_if_none(default: Any) -> BeforeValidator:
    return BeforeValidator(lambda v: default if v is None else v)


class ResponseTextFormat(_Request):
    """The Responses API's `text.format`: text, json_object, or json_schema with its fields inline."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not
    description: str | None = None


class ResponseText(_Request):
    format: ResponseTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_SamplingFields):
    """POST /v1/responses (OpenAI's Responses API). vLLM's sampling extensions (top_k, min_p, penalties,
    seed, stop, ...) are accepted as in chat completions; `n` and `max_tokens` are not Responses fields.
    Other fields are kept (extra="allow") so that the ones this server does not implement get a 400."""

    model_config = ConfigDict(strict=True, extra="allow")

    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: Annotated[Number, _default_if_none(1.0)] = 1.0
    top_p: Annotated[Number, _default_if_none(1.0)] = 1.0
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseText | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None


class TokenizeRequest(_Request):
    """vLLM's POST /tokenize: a `prompt` (add_special_tokens defaults to true) or chat `messages` (rendered
    with the chat template; add_special_tokens defaults to false, as the template writes BOS)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, price_input_per_m: float, price_output_per_m: float) -> dict:
    cost = (prompt_tokens * price_input_per_m + completion_tokens * price_output_per_m) / 1e6
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "estimated_cost": round(cost, 10)}


def envelope(id: str, object: str, model: str, created: int | None = None,
             system_fingerprint: str | None = None) -> dict[str, Any]:
    return {"id": id, "object": object, "created": created or int(time.time()), "model": model,
            "system_fingerprint": system_fingerprint}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], top: int) -> dict[str, Any]:
    """OpenAI chat form: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    content = []
    for lp, tid in zip(entries, token_ids):
        chosen = lp[tid]
        alternatives = sorted((v for v in lp.values() if v.rank is not None), key=lambda v: v.rank)[:top]
        content.append({
            "token": chosen.decoded_token, "logprob": chosen.logprob, "bytes": _token_bytes(chosen.decoded_token or ""),
            "top_logprobs": [{"token": v.decoded_token, "logprob": v.logprob,
                              "bytes": _token_bytes(v.decoded_token or "")} for v in alternatives],
        })
    return {"content": content}


def completion_logprobs(entries: list[dict[int, Logprob] | None], token_ids: list[int], token_text: list[str],
                        start_offset: int) -> dict[str, Any]:
    """OpenAI legacy form: tokens, token_logprobs, top_logprobs ({token text: logprob}), text_offset.

    An entry of None (the first prompt token, which nothing predicts) gives logprob None and top None,
    which is what lm-evaluation-harness expects from echoed prompts.
    """
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = start_offset
    for entry, tid, text in zip(entries, token_ids, token_text):
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(entry[tid].logprob)
        top: dict[str, float] = {}
        for v in entry.values():
            key = v.decoded_token or ""
            top[key] = max(top.get(key, v.logprob), v.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def pydantic_error(exc: Any) -> APIError:
    """The first pydantic validation error as a 400 naming the field."""
    err = exc.errors()[0]
    loc = ""
    for part in err.get("loc", ()):  # ("messages", 0, "role") -> "messages[0].role"; union tags dropped
        if isinstance(part, int):
            loc += f"[{part}]"
        elif part not in _TYPE_TAGS and not part.startswith(("function-", "union[")):
            loc += f".{part}" if loc else part
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return APIError(400, f"{loc} is required", param=loc, code="missing_required_parameter")
    got = err.get("input")
    return APIError(400, f"{loc}: {msg}, got {got!r:.100}", param=loc, code="invalid_value")


SAMPLING_FIELDS = ("n", "temperature", "top_p", "min_p", "top_k", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop_token_ids", "logit_bias",
                   "logprobs", "prompt_logprobs", "structured_outputs")


def value_error(e: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError from validation as a 400; the param is the field its message starts with."""
    message = str(e)
    first = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    in_field = first.split(".", 1)[0] in SAMPLING_FIELDS  # "structured_outputs.json: ..." too
    param = first if in_field or first.startswith(("messages", "tools")) else default_param
    if first == "messages" or message.startswith("messages["):
        param = message.split(" ", 1)[0].rstrip(":")
    return APIError(400, message, param=param, code="invalid_value")

