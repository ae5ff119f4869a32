"""POST /v1/responses (and /v1/openai/responses): OpenAI's Responses API, on the chat path.

The request becomes a chat request (responses_input.py), which is templated, constrained (tools
required/named, text.format) and sampled exactly as a chat completion. The answer is one `output`:
a message with one output_text part, or function_call items when the text is the model's tool calls
(as chat's `tool_calls`). A response that ran out of tokens (max_output_tokens, or the context) is
status "incomplete" with incomplete_details.reason "max_output_tokens", as OpenAI's.

`stream: true` sends OpenAI's server-sent events, each `event: TYPE` + `data: {..., "sequence_number"}`:
response.created, response.in_progress; for a message output_item.added, content_part.added,
output_text.delta..., output_text.done, content_part.done, output_item.done; for each call
output_item.added, function_call_arguments.delta, function_call_arguments.done, output_item.done;
then response.completed (or response.incomplete). A failure after the first event is an `error`
event and response.failed. Text that may become a tool call is held back until it is known, as in
chat streaming.

Stored responses (response_store.py) answer previous_response_id and GET/DELETE /v1/responses/{id}.
"""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fp8_turbo.engine.core.outputs import CompletionOutput, RequestOutput
from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.serving.metrics import RequestTiming
from fp8_turbo.engine.serving.protocol import APIError, ResponsesRequest, chat_logprobs, usage
from fp8_turbo.engine.serving.request_context import server_error
from fp8_turbo.engine.serving.response_store import ResponseStore, StoredResponse
from fp8_turbo.engine.serving.responses_input import chat_request, check_fields, responses_error
from fp8_turbo.engine.serving.structure import Structure, chat_structure, may_be_tool_call
from fp8_turbo.tokenizer.tool_calls import ToolCall

if TYPE_CHECKING:
    from fp8_turbo.engine.serving.server import OpenAIServer

LOGPROBS_INCLUDE = "message.output_text.logprobs"
Handler = Callable[[Request], Awaitable[Response]]


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class _Answer:
    """The output items of one response, built once so the streamed events and the final object agree."""

    def __init__(self, structure: Structure, top_logprobs: int | None):
        self.structure, self.top_logprobs = structure, top_logprobs
        self.message_id = _id("msg")

    def text_part(self, text: str, logprobs: list | None) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.top_logprobs is not None:
            part["logprobs"] = logprobs or []
        return part

    def message(self, status: str, content: list[dict]) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def call_item(call: ToolCall, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
        return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": status,
                "call_id": call.id, "name": call.name, "arguments": call.arguments if arguments is None else arguments}

    def logprobs(self, c: CompletionOutput, start: int = 0) -> list | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(c.logprobs[start:], c.token_ids[start:], self.top_logprobs)["content"]

    def items(self, c: CompletionOutput) -> list[dict[str, Any]]:
        calls = self.structure.tool_calls(c.text)
        if calls:
            return [self.call_item(call) for call in calls]
        return [self.message(_status(c), [self.text_part(c.text, self.logprobs(c))])]


def _status(c: CompletionOutput) -> str:
    return "incomplete" if c.finish_reason == "length" else "completed"


def conversation_of(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as chat messages, for the next turn of previous_response_id."""
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": json.loads(i["arguments"])}}
             for i in items if i["type"] == "function_call"]
    if calls:
        return [{"role": "assistant", "content": None, "tool_calls": calls}]
    text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
    return [{"role": "assistant", "content": text}]


class ResponsesAPI:
    def __init__(self, server: OpenAIServer, store: ResponseStore | None = None):
        self.server = server
        self.store = store or ResponseStore()

    # ---- POST /v1/responses ---------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        s = self.server
        s.authorize(request)
        req: ResponsesRequest = s.parse(ResponsesRequest, await s.read_json(request))
        s.check_model(req.model)
        check_fields(req)
        s.limits.check_request(1, req.stop, req.stop_token_ids)
        history: list[dict] = []
        if req.previous_response_id is not None:
            previous = self.store.get(req.previous_response_id)
            if previous is None:
                raise APIError(400, f"previous_response_id: no stored response has the id "
                                    f"{req.previous_response_id!r:.80} (this server keeps the last "
                                    f"{self.store.max_responses} stored responses, in memory)",
                               param="previous_response_id", code="previous_response_not_found")
            history = previous.conversation
        logprobs = (req.top_logprobs or 0) if LOGPROBS_INCLUDE in (req.include or []) else None
        try:
            chat, conversation = chat_request(req, history)
            structure = chat_structure(chat)
            params = s.sampling_params(req, req.max_output_tokens, logprobs, max_tokens_param="max_output_tokens",
                                       structured=structure.params)
            prompt_ids = await s.run_blocking(s._chat_prompt, chat, structure, params)
        except APIError as e:
            raise responses_error(e) from None
        response_id = _id("resp")
        s.submit([response_id], [prompt_ids], params, "input")
        s.metrics.prompt_tokens += len(prompt_ids)
        answer = _Answer(structure, logprobs)
        head = self._head(req, response_id, int(time.time()))
        finish = _Finisher(self, req, head, conversation, len(prompt_ids))
        if req.stream:
            return s.stream_response(self._stream(response_id, params, answer, finish, arrival), response_id)
        try:
            final = await s.run_to_end(request, response_id, arrival)
        finally:
            s.aengine.release(response_id)  # (a no-op unless it never started)
        c = final.outputs[0]
        if c.finish_reason == "error":  # the grammar failed while generating: a 400, never a partial "completed"
            raise responses_error(structure.failure(0, c.error))
        return JSONResponse(finish(answer.items(c), c, final))

    def _head(self, req: ResponsesRequest, response_id: str, created: int) -> dict[str, Any]:
        """The response object's fields that do not change while it runs."""
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
            {"type": "text"}
        return {
            "id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "model": req.model or self.server.model_name, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "reasoning": None, "service_tier": "default",
            "store": req.store is not False, "temperature": req.temperature, "text": {"format": fmt},
            "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
            "tools": req.tools or [], "top_logprobs": req.top_logprobs or 0, "top_p": req.top_p,
            "truncation": "disabled", "usage": None, "user": req.user, "metadata": req.metadata or {},
        }

    # ---- streaming ------------------------------------------------------------------------------
    async def _stream(self, response_id: str, params: SamplingParams, answer: _Answer, finish: _Finisher,
                      arrival: float) -> AsyncIterator[str]:
        s, sequence = self.server, [0]

        def event(kind: str, **fields: Any) -> str:
            body = {"type": kind, "sequence_number": sequence[0], **fields}
            sequence[0] += 1
            return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

        head = finish.head
        yield event("response.created", response=head)
        yield event("response.in_progress", response=head)
        holding = answer.structure.parses_tool_calls  # text that may be a tool call is held until the end
        started, sent_chars, sent_tokens, done = False, 0, 0, False
        where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
        timing = RequestTiming(s.metrics, arrival)
        try:
            async with aclosing(s.aengine.stream(response_id)) as outputs:
                async for out in outputs:
                    timing.update(out)
                    c = out.outputs[0]
                    if c.finish_reason == "error":  # the grammar failed while generating
                        done = True
                        error = responses_error(answer.structure.failure(0, c.error))
                        yield event("error", code=error.code, message=error.message, param=error.param)
                        yield event("response.failed", response={**head, "status": "failed",
                                                                 "error": {"code": error.code, "message": error.message}})
                        break
                    if holding and not may_be_tool_call(c.text):
                        holding = False  # plainly prose: stream it
                    finished = c.finish_reason is not None
                    calls = answer.structure.tool_calls(c.text) if finished and holding else None
                    if calls:
                        items = [answer.call_item(call) for call in calls]
                        for k, (call, item) in enumerate(zip(calls, items)):
                            at = {"item_id": item["id"], "output_index": k}
                            yield event("response.output_item.added", output_index=k,
                                        item=answer.call_item(call, "in_progress", ""))
                            yield event("response.function_call_arguments.delta", **at, delta=call.arguments)
                            yield event("response.function_call_arguments.done", **at, name=call.name,
                                        arguments=call.arguments)
                            yield event("response.output_item.done", output_index=k, item=item)
                    elif not holding or finished:
                        if not started:
                            started = True
                            yield event("response.output_item.added", output_index=0,
                                        item=answer.message("in_progress", []))
                            yield event("response.content_part.added", **where, part=answer.text_part("", []))
                        text = c.text[sent_chars:]
                        if text:
                            logprobs = answer.logprobs(c, sent_tokens)
                            yield event("response.output_text.delta", **where, delta=text, logprobs=logprobs or [])
                            sent_chars, sent_tokens = len(c.text), len(c.token_ids)
                    if finished:
                        done = True
                        if not calls:
                            items = [answer.message(_status(c), [answer.text_part(c.text, answer.logprobs(c))])]
                            part = items[0]["content"][0]
                            yield event("response.output_text.done", **where, text=c.text,
                                        logprobs=part.get("logprobs", []))
                            yield event("response.content_part.done", **where, part=part)
                            yield event("response.output_item.done", output_index=0, item=items[0])
                        body = finish(items, c, out)
                        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
                        yield event(kind, response=body)
        except Exception as e:  # noqa: BLE001 -- one failing request answers error events, never kills the server
            error = server_error(e)
            yield event("error", code=error.code, message=error.message, param=None)
            yield event("response.failed", response={**head, "status": "failed",
                                                     "error": {"code": "server_error", "message": error.message}})
        except BaseException:  # the client went away (cancelled): the request was aborted by aclosing
            if not done:
                s.metrics.aborted_requests += 1
            raise

    # ---- stored responses -----------------------------------------------------------------------
    async def retrieve(self, request: Request) -> Response:
        self.server.authorize(request)
        return JSONResponse(self._stored(request).body)

    async def delete(self, request: Request) -> Response:
        self.server.authorize(request)
        stored = self._stored(request)
        self.store.delete(stored.body["id"])
        return JSONResponse({"id": stored.body["id"], "object": "response.deleted", "deleted": True})

    def _stored(self, request: Request) -> StoredResponse:
        response_id = request.path_params["response_id"]
        stored = self.store.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response has the id {response_id!r:.80}", param="response_id",
                           code="not_found")
        return stored


class _Finisher:
    """Builds the final response object (status, output, usage) and stores it unless store is false."""

    def __init__(self, api: ResponsesAPI, req: ResponsesRequest, head: dict, conversation: list[dict],
                 prompt_tokens: int):
        self.api, self.req, self.head = api, req, head
        self.conversation, self.prompt_tokens = conversation, prompt_tokens

    def __call__(self, items: list[dict], c: CompletionOutput, final: RequestOutput) -> dict[str, Any]:
        status = "incomplete" if c.finish_reason == "length" and items[0]["type"] == "message" else "completed"
        output_tokens = len(c.token_ids)
        u = usage(self.prompt_tokens, output_tokens, *self.api.server.prices)
        body = {**self.head, "status": status, "output": items,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "completed_at": int(time.time()) if status == "completed" else None,
                "usage": {"input_tokens": self.prompt_tokens,
                          "input_tokens_details": {"cached_tokens": final.num_cached_tokens, "cache_write_tokens": 0},
                          "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": self.prompt_tokens + output_tokens, "estimated_cost": u["estimated_cost"]}}
        if self.req.store is not False:
            self.api.store.put(body, self.conversation + conversation_of(items))
        return body


def add_responses_routes(app: FastAPI, server: OpenAIServer, route: Callable[[str | None, Handler], Any]) -> None:
    api = ResponsesAPI(server)
    for prefix in ("/v1", "/v1/openai"):
        app.add_api_route(f"{prefix}/responses", route("responses", api.create), methods=["POST"])
        app.add_api_route(f"{prefix}/responses/{{response_id}}", route("responses", api.retrieve), methods=["GET"])
        app.add_api_route(f"{prefix}/responses/{{response_id}}", route("responses", api.delete), methods=["DELETE"])
