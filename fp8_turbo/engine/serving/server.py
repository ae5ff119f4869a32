"""The OpenAI-compatible HTTP server: chat and text completions (streaming too), models, health, metrics;
the Responses API (responses.py) and /tokenize (tokenization.py) register their routes here.

One AsyncLLMEngine (one engine loop, continuous batching) serves every connection. A handler turns the
body into token ids and SamplingParams (tokenizing in a worker thread, off the event loop), checks
everything that can be checked before the first token (so bad requests get a 4xx, never a broken
stream), queues the request (a 503 when the queue is full), then follows `AsyncLLMEngine.stream`.
Leaving that stream early -- a client gone, an error -- aborts the request and frees its KV blocks.
Limits are in limits.py, body checks in body.py, request ids and 500s in request_context.py, shutdown
and engine death in lifecycle.py.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from fp8_turbo.engine.core.async_engine import AsyncLLMEngine
from fp8_turbo.engine.core.llm_engine import LLMEngine, PromptTooLongError
from fp8_turbo.engine.serving.body import check_message_json, read_json
from fp8_turbo.engine.serving.lifecycle import Lifecycle, check_engine, serve
from fp8_turbo.engine.serving.limits import ServerLimits, limits_from_args
from fp8_turbo.engine.serving.metrics import RequestTiming, ServerMetrics
from fp8_turbo.engine.serving.request_context import RequestContextMiddleware, error_response, server_error
from fp8_turbo.engine.serving.responses import add_responses_routes
from fp8_turbo.engine.serving.tokenization import add_tokenization_routes
from fp8_turbo.engine.serving.scheme import served_scheme
from fp8_turbo.engine.core.outputs import CompletionOutput, RequestOutput
from fp8_turbo.engine.serving.protocol import (
    API_KEY_ENV, DEFAULT_PRICE_INPUT_PER_M, DEFAULT_PRICE_OUTPUT_PER_M, APIError, ChatCompletionRequest, CompletionRequest,
    _SamplingFields, chat_logprobs, completion_logprobs, envelope, new_id, pydantic_error, usage, value_error,
)
from fp8_turbo.engine.sampling.params import SamplingParams, StructuredOutputsParams
from fp8_turbo.engine.sampling.structured import GrammarError
from fp8_turbo.engine.serving.structure import Structure, chat_structure, completion_structure, may_be_tool_call
from fp8_turbo.engine.serving.web_ui import add_web_ui

logger = logging.getLogger("fp8_turbo")


class _EngineStream(StreamingResponse):
    """SSE for requests already queued in the engine: however the response ends -- even before its first
    byte, when the stream never starts -- `release` forgets them (a no-op once they are followed)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class OpenAIServer:
    def __init__(self, engine: LLMEngine, *, served_model_name: str, api_key: str | None = None,
                 price_input_per_m: float = DEFAULT_PRICE_INPUT_PER_M,
                 price_output_per_m: float = DEFAULT_PRICE_OUTPUT_PER_M, limits: ServerLimits | None = None,
                 metrics_public: bool = False, shutdown_timeout: float = 30.0):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name
        self.api_key = api_key.encode() if api_key else None
        self.prices = (price_input_per_m, price_output_per_m)
        self.limits = limits or ServerLimits()
        engine.structured.set_limits(cache_bytes=self.limits.grammar_cache_bytes,
                                     max_grammar_chars=self.limits.max_grammar_chars)
        self.metrics_public = metrics_public
        self.aengine = AsyncLLMEngine(engine)
        self.lifecycle = Lifecycle(self.aengine, shutdown_timeout)
        self.metrics = ServerMetrics(served_model_name)
        self.created = int(time.time())
        # Templating, tokenization, detokenization and big JSON bodies: off the event loop, and off the
        # default executor that runs the engine's steps.
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fp8-turbo-tokenize")
        # Names the configuration that produced an answer (OpenAI's system_fingerprint): model, weights, KV cache.
        config = engine.config
        scheme = getattr(engine, "quant_scheme", config.quantization)  # what runs ("fp8" is the backend's pick)
        configuration = f"{config.model}|{scheme}|{config.kv_cache_dtype}|{engine.dtype}"
        self.system_fingerprint = "fp_" + hashlib.sha256(configuration.encode()).hexdigest()[:10]
        self.scheme = served_scheme(engine)  # what the model computes in, for the model card

    # ---- request plumbing -----------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict[str, Any]:
        return await read_json(request, self.limits.max_request_bytes, self.limits.body_timeout, self.run_blocking)

    async def run_blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in the server's worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, partial(fn, *args, **kwargs))

    @staticmethod
    def parse(model: type[BaseModel], body: dict) -> Any:
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise pydantic_error(e) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def sampling_params(self, req: _SamplingFields, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None, max_tokens_param: str = "max_tokens",
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs, prompt_logprobs, structured)
        except ValueError as e:
            error = value_error(e)
            if error.param == "max_tokens" and max_tokens_param != "max_tokens":  # the field the client sent
                error.param, error.message = max_tokens_param, error.message.replace("max_tokens", max_tokens_param, 1)
            raise error from None

    def check_grammar(self, structure: Structure) -> None:
        """Compile (and cache) the request's grammar now, so an invalid or unsupported one is a 400 naming
        its field. In a worker thread: the first grammar builds llguidance's tokenizer."""
        if structure.params is None:
            return
        try:
            self.engine.structured.compile(structure.params)
        except GrammarError as e:
            raise structure.grammar_error(e, self.engine.structured.compile) from None

    def check_fits(self, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.engine.check_request(prompt_ids, params)
        except PromptTooLongError as e:  # min_tokens past the room the context leaves names min_tokens
            field = "min_tokens" if "min_tokens is" in str(e) else param
            raise APIError(400, str(e), param=field, code="context_length_exceeded") from None
        except ValueError as e:  # out-of-vocabulary ids name their field (stop_token_ids, logit_bias)
            raise value_error(e, param) from None

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return usage(prompt_tokens, completion_tokens, *self.prices)

    def submit(self, request_ids: list[str], prompts: list[list[int]], params: SamplingParams, param: str) -> None:
        """Admission (a 503 when the queue is full), then queue every prompt in the engine, all or none."""
        a = self.aengine
        self.limits.check_capacity(a.num_waiting_seqs, a.num_waiting_tokens, params.n * len(prompts),
                                   params.n * sum(map(len, prompts)), param)
        added: list[str] = []
        try:
            for request_id, ids in zip(request_ids, prompts):
                a.add_request(request_id, ids, params)
                added.append(request_id)
        except BaseException:
            for request_id in added:
                a.release(request_id)
            raise

    def stream_response(self, stream: AsyncIterator[str], request_id: str) -> StreamingResponse:
        return _EngineStream(stream, partial(self.aengine.release, request_id))

    async def run_to_end(self, request: Request, request_id: str, arrival: float) -> RequestOutput:
        """Follow a submitted request to its last output; a client that goes away aborts it."""
        timing = RequestTiming(self.metrics, arrival)
        final = None
        async with aclosing(self.aengine.stream(request_id)) as outputs:
            async for out in outputs:
                timing.update(out)
                final = out
                if not out.finished and await request.is_disconnected():
                    self.metrics.aborted_requests += 1
                    raise APIError(499, "the client closed the connection", code="client_closed")
        return final

    def envelope(self, request_id: str, object: str, model: str, created: int | None = None) -> dict[str, Any]:
        return envelope(request_id, object, model, created, self.system_fingerprint)

    def _chat_prompt(self, req: ChatCompletionRequest, structure: Structure, params: SamplingParams) -> list[int]:
        """Template and tokenize (in a worker thread: a 4 MB conversation takes seconds), compile the
        grammar if any (its first one builds llguidance's tokenizer, ~1-2 s), then check the fit."""
        check_message_json(req.messages)
        try:
            prompt_ids = self.tokenizer.apply_chat_template(req.messages, tools=structure.tools)
        except ValueError as e:
            raise value_error(e, "messages") from None
        self.check_grammar(structure)
        self.check_fits(prompt_ids, params, "messages")
        return prompt_ids

    # ---- chat completions -----------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self.authorize(request)
        req: ChatCompletionRequest = self.parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        self.limits.check_request(req.n, req.stop, req.stop_token_ids)
        structure = chat_structure(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be an integer in [0, 20], got {req.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_completion_tokens is not None:
            max_tokens, max_tokens_param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_tokens_param = req.max_tokens, "max_tokens"
        params = self.sampling_params(req, max_tokens, logprobs, max_tokens_param=max_tokens_param,
                                      structured=structure.params)
        prompt_ids = await self.run_blocking(self._chat_prompt, req, structure, params)
        request_id = new_id("chatcmpl")
        self.submit([request_id], [prompt_ids], params, "messages")
        self.metrics.prompt_tokens += len(prompt_ids)
        model = req.model or self.model_name
        if req.stream:
            stream = self._chat_stream(request_id, model, prompt_ids, params, structure, req.include_usage, arrival)
            return self.stream_response(stream, request_id)

        try:
            final = await self.run_to_end(request, request_id, arrival)
        finally:
            self.aengine.release(request_id)  # (a no-op unless it never started)
        _check_failures([(c.index, c) for c in final.outputs], structure)
        choices = [self._chat_choice(c, structure, logprobs) for c in final.outputs]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        body = self.envelope(request_id, "chat.completion", model)
        body["choices"] = choices
        body["usage"] = self.usage(len(prompt_ids), completion_tokens)
        return JSONResponse(body)

    @staticmethod
    def _chat_choice(c: CompletionOutput, structure: Structure, top_logprobs: int | None) -> dict:
        calls = structure.tool_calls(c.text) if c.finish_reason != "error" else None
        if calls:
            message = {"role": "assistant", "content": None, "refusal": None,
                       "tool_calls": [call.to_openai() for call in calls]}
        else:
            message = {"role": "assistant", "content": c.text, "refusal": None}
        choice: dict[str, Any] = {"index": c.index, "message": message, "logprobs": None}
        if top_logprobs is not None:
            choice["logprobs"] = chat_logprobs(c.logprobs or [], c.token_ids, top_logprobs)
        choice["finish_reason"] = "tool_calls" if calls else _finish_reason(c)
        if c.finish_reason == "error":  # its grammar failed (the others did not: _check_failures)
            choice["error"] = structure.failure(c.index, c.error).body()["error"]
        return choice

    async def _chat_stream(self, request_id: str, model: str, prompt_ids: list[int], params: SamplingParams,
                           structure: Structure, include_usage: bool, arrival: float) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[dict], **extra: Any) -> str:
            body = {**self.envelope(request_id, "chat.completion.chunk", model, created), "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        sent_chars = [0] * params.n  # text already sent, per choice
        sent_tokens = [0] * params.n  # tokens whose logprobs were sent
        holding = [structure.parses_tool_calls] * params.n  # text that may be a tool call is held until the end
        done = [False] * params.n
        timing = RequestTiming(self.metrics, arrival)
        completion_tokens = 0
        for i in range(params.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        try:
            async with aclosing(self.aengine.stream(request_id)) as outputs:
                async for out in outputs:
                    timing.update(out)
                    for c in out.outputs:
                        i = c.index
                        if done[i]:
                            continue
                        if c.finish_reason == "error":  # its grammar failed: an error event, the others go on
                            done[i] = True
                            completion_tokens += len(c.token_ids)
                            yield _error_event(structure.failure(i, c.error))
                            continue
                        if holding[i] and not may_be_tool_call(c.text):
                            holding[i] = False  # plainly prose: stream it
                        finished = c.finish_reason is not None
                        calls = structure.tool_calls(c.text) if finished and holding[i] else None
                        if calls:
                            deltas = [{"index": k, **call.to_openai()} for k, call in enumerate(calls)]
                            yield chunk([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": None,
                                          "finish_reason": None}])
                        elif not holding[i] or finished:
                            text = c.text[sent_chars[i]:]
                            new_tokens = len(c.token_ids) > sent_tokens[i]
                            if text or (params.logprobs is not None and new_tokens and finished):
                                choice: dict[str, Any] = {"index": i, "delta": {"content": text}, "logprobs": None}
                                if params.logprobs is not None:
                                    choice["logprobs"] = chat_logprobs(c.logprobs[sent_tokens[i]:],
                                                                       c.token_ids[sent_tokens[i]:], params.logprobs)
                                    sent_tokens[i] = len(c.token_ids)
                                choice["finish_reason"] = None
                                yield chunk([choice])
                                sent_chars[i] = len(c.text)
                        if finished:
                            done[i] = True
                            completion_tokens += len(c.token_ids)
                            reason = "tool_calls" if calls else _finish_reason(c)
                            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield chunk([], usage=self.usage(len(prompt_ids), completion_tokens))
        except Exception as e:  # noqa: BLE001 -- one failing request answers an error event, never kills the server
            # Headers are sent: report the failure in the stream, as OpenAI-compatible servers do.
            yield f"data: {json.dumps(server_error(e).body())}\n\n"
        except BaseException:  # the client went away (cancelled): the request was aborted by aclosing
            if not all(done):
                self.metrics.aborted_requests += 1
            raise
        yield "data: [DONE]\n\n"

    # ---- text completions -----------------------------------------------------------------------
    def _prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append((p, self.tokenizer.encode(p)))
            else:
                out.append((None, list(p)))
        return out

    def _completion_prompts(self, req: CompletionRequest, structure: Structure,
                            params: SamplingParams) -> list[tuple[str | None, list[int]]]:
        """Tokenize (in a worker thread), compile the grammar if any, and check that every prompt fits."""
        prompts = self._prompts(req)
        self.check_grammar(structure)
        for _, ids in prompts:
            self.check_fits(ids, params, "prompt")
        return prompts

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self.authorize(request)
        req: CompletionRequest = self.parse(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of", code="unsupported_value")
        num_prompts = _num_prompts(req.prompt)
        self.limits.check_request(req.n, req.stop, req.stop_token_ids, num_prompts)
        if req.stream and num_prompts != 1:
            raise APIError(400, "streaming takes one prompt", param="prompt", code="unsupported_value")
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        structure = completion_structure(req)
        params = self.sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs, structured=structure.params)
        prompts = await self.run_blocking(self._completion_prompts, req, structure, params)
        request_id = new_id("cmpl")
        request_ids = [request_id] if req.stream else [f"{request_id}-{p}" for p in range(len(prompts))]
        self.submit(request_ids, [ids for _, ids in prompts], params, "prompt")
        for _, ids in prompts:
            self.metrics.prompt_tokens += len(ids)
        model = req.model or self.model_name
        if req.stream:
            stream = self._completion_stream(request_id, model, prompts[0], params, req, structure, arrival)
            return self.stream_response(stream, request_id)

        tasks = [asyncio.ensure_future(self.run_to_end(request, rid, arrival)) for rid in request_ids]
        try:
            finals = await asyncio.gather(*tasks)
        finally:  # one prompt failing (or the client leaving) ends the others too
            for task in tasks:
                task.cancel()
            for rid in request_ids:
                self.aengine.release(rid)

        _check_failures([(p * params.n + c.index, c) for p, final in enumerate(finals) for c in final.outputs],
                        structure)

        def build_choices() -> tuple[list[dict], int, int]:  # detokenizes echoed prompts: in a worker thread
            choices, completion_tokens, prompt_tokens = [], 0, 0
            for p, ((_, ids), final) in enumerate(zip(prompts, finals)):
                prompt_tokens += len(ids)
                for c in final.outputs:
                    completion_tokens += len(c.token_ids)
                    choice = self._completion_choice(p * params.n + c.index, ids, final, c, req)
                    if c.finish_reason == "error":  # its grammar failed (not every choice's: _check_failures)
                        choice["error"] = structure.failure(choice["index"], c.error).body()["error"]
                    choices.append(choice)
            return choices, completion_tokens, prompt_tokens

        choices, completion_tokens, prompt_tokens = await self.run_blocking(build_choices)
        body = self.envelope(request_id, "text_completion", model)
        body["choices"] = choices
        body["usage"] = self.usage(prompt_tokens, completion_tokens)
        return JSONResponse(body)

    def _completion_choice(self, index: int, prompt_ids: list[int], final: RequestOutput, c: CompletionOutput,
                           req: CompletionRequest) -> dict:
        prompt_text = self.tokenizer.decode(prompt_ids) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            entries: list = list(c.logprobs or [])
            ids = list(c.token_ids)
            if req.echo:
                entries = list(final.prompt_logprobs or [None] * len(prompt_ids)) + entries
                ids = prompt_ids + ids
            texts = [self.tokenizer.token_text(t) for t in ids]
            logprobs = completion_logprobs(entries, ids, texts, 0)
        return {"index": index, "text": prompt_text + c.text, "logprobs": logprobs, "finish_reason": _finish_reason(c)}

    async def _completion_stream(self, request_id: str, model: str, prompt: tuple[str | None, list[int]],
                                 params: SamplingParams, req: CompletionRequest, structure: Structure,
                                 arrival: float) -> AsyncIterator[str]:
        created = int(time.time())
        _, prompt_ids = prompt

        def chunk(choices: list[dict], **extra: Any) -> str:
            body = {**self.envelope(request_id, "text_completion", model, created), "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        sent = [0] * params.n
        done = [False] * params.n
        timing = RequestTiming(self.metrics, arrival)
        completion_tokens = 0
        if req.echo:
            prompt_text = await self.run_blocking(self.tokenizer.decode, prompt_ids)
            for i in range(params.n):
                yield chunk([{"index": i, "text": prompt_text, "logprobs": None, "finish_reason": None}])
        try:
            async with aclosing(self.aengine.stream(request_id)) as outputs:
                async for out in outputs:
                    timing.update(out)
                    for c in out.outputs:
                        if done[c.index]:  # (a finished choice stays in the outputs of later steps)
                            continue
                        done[c.index] = c.finish_reason is not None
                        text = c.text[sent[c.index]:]
                        if text:
                            sent[c.index] = len(c.text)
                            yield chunk([{"index": c.index, "text": text, "logprobs": None, "finish_reason": None}])
                        if c.finish_reason == "error":  # its grammar failed: an error event, the others go on
                            completion_tokens += len(c.token_ids)
                            yield _error_event(structure.failure(c.index, c.error))
                        elif c.finish_reason is not None:
                            completion_tokens += len(c.token_ids)
                            yield chunk([{"index": c.index, "text": "", "logprobs": None,
                                          "finish_reason": _finish_reason(c)}])
            if req.include_usage:
                yield chunk([], usage=self.usage(len(prompt_ids), completion_tokens))
        except Exception as e:  # noqa: BLE001 -- one failing request answers an error event, never kills the server
            yield f"data: {json.dumps(server_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"

    # ---- the rest -------------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fp8-turbo",
                "max_model_len": self.engine.max_model_len, "quantization": self.scheme}

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{model}: the card of the served model, 404 for any other name."""
        self.authorize(request)
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        try:
            self.engine.check_health()  # a dead tensor-parallel worker, even while idle
            reason = self.lifecycle.unavailable()  # (the middleware answers these first)
        except RuntimeError as e:
            reason = str(e)
        if reason is not None:
            return error_response(APIError(503, reason, type="server_error", code="service_unavailable"))
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        if not self.metrics_public:
            self.authorize(request)
        text = self.metrics.render(self.engine, self.aengine.num_requests)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _num_prompts(prompt: str | list) -> int:
    """How many prompts `prompt` holds: a string or a list of token ids is one."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return 1
    return len(prompt)


def _finish_reason(c: CompletionOutput) -> str:
    return c.finish_reason if c.finish_reason in ("length", "error") else "stop"


def _check_failures(indexed: list[tuple[int, CompletionOutput]], structure: Structure) -> None:
    """When every choice's grammar failed while it was generated, the answer is that 400 (the first one's);
    when only some did, each of those carries finish_reason "error" and its `error` in the answer."""
    failed = [(index, c) for index, c in indexed if c.finish_reason == "error"]
    if failed and len(failed) == len(indexed):
        index, c = failed[0]
        raise structure.failure(index, c.error)


def _error_event(e: APIError) -> str:
    """An SSE error event (OpenAI's error body), as a stream reports what failed after its headers."""
    return f"data: {json.dumps(e.body())}\n\n"


def build_app(engine: LLMEngine, *, served_model_name: str, api_key: str | None = None,
              price_input_per_m: float = DEFAULT_PRICE_INPUT_PER_M,
              price_output_per_m: float = DEFAULT_PRICE_OUTPUT_PER_M, limits: ServerLimits | None = None,
              metrics_public: bool = False, shutdown_timeout: float = 30.0, web_ui: bool = True) -> FastAPI:
    server = OpenAIServer(engine, served_model_name=served_model_name, api_key=api_key,
                          price_input_per_m=price_input_per_m, price_output_per_m=price_output_per_m,
                          limits=limits, metrics_public=metrics_public, shutdown_timeout=shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.aengine.start()
        yield
        await server.aengine.stop()
        server.cpu_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fp8-turbo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.lifecycle = server.lifecycle
    app.add_middleware(RequestContextMiddleware, availability=server.lifecycle)

    def route(endpoint: str | None, handler: Callable[[Request], Awaitable[Response]]):
        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except APIError as e:
                response = error_response(e)
            except Exception as e:  # one failing request must not take the server down
                response = error_response(server_error(e))
            if endpoint is not None:
                server.metrics.count_request(endpoint, response.status_code)
            return response
        return handle

    for path in ("/v1/chat/completions", "/v1/openai/chat/completions"):
        app.add_api_route(path, route("chat", server.chat_completions), methods=["POST"])
    app.add_api_route("/v1/completions", route("completions", server.completions), methods=["POST"])
    app.add_api_route("/v1/openai/completions", route("completions", server.completions), methods=["POST"])
    app.add_api_route("/v1/models", route("models", server.models), methods=["GET"])
    app.add_api_route("/v1/openai/models", route("models", server.models), methods=["GET"])
    for path in ("/v1/models/{model:path}", "/v1/openai/models/{model:path}"):
        app.add_api_route(path, route("models", server.model), methods=["GET"])
    add_responses_routes(app, server, route)
    add_tokenization_routes(app, server, route)
    app.add_api_route("/health", route(None, server.health), methods=["GET"])
    app.add_api_route("/metrics", route(None, server.metrics_text), methods=["GET"])
    if web_ui:
        add_web_ui(app)  # the chat page at /

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods still answer in OpenAI's error shape (auth first under /v1), with the
        # router's headers (Allow on a 405).
        if request.url.path.startswith("/v1"):
            try:
                server.authorize(request)
            except APIError as e:
                return error_response(e)
        return error_response(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code),
                                       headers=exc.headers))

    return app


def run_server(args: argparse.Namespace) -> int:
    """`fp8-turbo serve`: load the model, then serve until a signal (exit 0) or the engine's death (exit 1)."""
    from fp8_turbo.engine.core.engine_config import EngineConfig

    logging.getLogger("fp8_turbo").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limits = limits_from_args(args)
    config = EngineConfig(model=args.model, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                          device=args.device, max_model_len=args.max_model_len, seed=args.seed,
                          tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                          enforce_eager=getattr(args, "enforce_eager", False),
                          deterministic=getattr(args, "deterministic", False),
                          kv_cache_memory_bytes=getattr(args, "kv_cache_memory", None),
                          lm_head_dtype=getattr(args, "lm_head_dtype", "auto"),
                          speculative_config=getattr(args, "speculative_config", None))
    engine = LLMEngine(config)
    if not check_engine(engine):
        engine.shutdown()
        return 1
    name = args.served_model_name or args.model
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = build_app(engine, served_model_name=name, api_key=api_key, price_input_per_m=args.price_input,
                    price_output_per_m=args.price_output, limits=limits, metrics_public=args.metrics_public,
                    shutdown_timeout=args.shutdown_timeout, web_ui=getattr(args, "web_ui", True))
    logger.info("loaded %s in %.1fs (quantization %s, KV cache %s: %d tokens); serving %r at http://%s:%d/v1%s",
                args.model, engine.load_seconds, engine.model.quant.describe(reason=False), config.kv_cache_dtype,
                engine.kv_capacity_tokens, name, args.host, args.port, " (API key required)" if api_key else "")
    if getattr(args, "web_ui", True):
        logger.info("chat page: http://%s:%d/", args.host, args.port)
    return serve(app, host=args.host, port=args.port, header_timeout=limits.header_timeout,
                 max_connections=limits.max_connections, retry_after=limits.retry_after)
