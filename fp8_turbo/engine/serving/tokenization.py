"""POST /tokenize and /detokenize (vLLM's request and response shapes), and /v1/embeddings, which
this server answers with a 400 saying that the model generates text and does not embed.

    /tokenize    {"prompt": str, "add_special_tokens": true} or {"messages": [...], "tools": [...],
                 "add_generation_prompt": true}  ->  {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [int]}  ->  {"prompt": str}

Both sit behind the API key like /v1; a chat is rendered by the same template as chat completions,
so `count` is the prompt_tokens a chat completion of those messages reports. Detokenizing keeps
special tokens, so tokenize -> detokenize gives back the text exactly (BOS included when added).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fp8_turbo.engine.serving.body import check_message_json
from fp8_turbo.engine.serving.protocol import APIError, DetokenizeRequest, TokenizeRequest, value_error

if TYPE_CHECKING:
    from fp8_turbo.engine.serving.server import OpenAIServer

Handler = Callable[[Request], Awaitable[Response]]


class TokenizationAPI:
    def __init__(self, server: OpenAIServer):
        self.server = server
        self.tokenizer = server.tokenizer

    async def tokenize(self, request: Request) -> Response:
        s = self.server
        s.authorize(request)
        req: TokenizeRequest = s.parse(TokenizeRequest, await s.read_json(request))
        s.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
        if req.continue_final_message:
            raise APIError(400, "continue_final_message is not supported", param="continue_final_message",
                           code="unsupported_value")
        ids, strs = await s.run_blocking(self._tokenize, req)
        return JSONResponse({"count": len(ids), "max_model_len": s.engine.max_model_len, "tokens": ids,
                             "token_strs": strs})

    def _tokenize(self, req: TokenizeRequest) -> tuple[list[int], list[str] | None]:
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            check_message_json(req.messages)  # tool-call arguments: parsed with the body's checks first
            try:
                text = self.tokenizer.render_chat(req.messages, tools=req.tools,
                                                  add_generation_prompt=req.add_generation_prompt)
            except ValueError as e:
                raise value_error(e, "messages") from None
            ids = self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        strs = self.tokenizer.hf.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return ids, strs

    async def detokenize(self, request: Request) -> Response:
        s = self.server
        s.authorize(request)
        req: DetokenizeRequest = s.parse(DetokenizeRequest, await s.read_json(request))
        s.check_model(req.model)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens",
                           code="invalid_value")
        text = await s.run_blocking(self.tokenizer.decode, req.tokens, skip_special_tokens=False)
        return JSONResponse({"prompt": text})

    async def embeddings(self, request: Request) -> Response:
        self.server.authorize(request)
        raise APIError(400, f"the model '{self.server.model_name}' generates text and does not embed: this server "
                            f"has no embeddings; use /v1/chat/completions, /v1/completions or /v1/responses",
                       param="model", code="model_not_supported")


def add_tokenization_routes(app: FastAPI, server: OpenAIServer, route: Callable[[str | None, Handler], Any]) -> None:
    api = TokenizationAPI(server)
    app.add_api_route("/tokenize", route("tokenize", api.tokenize), methods=["POST"])
    app.add_api_route("/detokenize", route("detokenize", api.detokenize), methods=["POST"])
    for path in ("/v1/embeddings", "/v1/openai/embeddings"):
        app.add_api_route(path, route("embeddings", api.embeddings), methods=["POST"])
