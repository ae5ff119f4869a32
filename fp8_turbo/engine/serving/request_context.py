"""Per-request context: an id on every response, generic 500s that carry it, and 503 while unavailable.

The id is the client's `x-request-id` when it sent a plain one (letters, digits, `.-_:`, at most 128),
else a new one; it is echoed in the `x-request-id` header of every response and set in
`request_id_var` for the handler (and the stream it returns), so that an internal error is logged
with it and answered with a generic message that quotes it, never with the exception's text.
"""
from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from typing import Any, Protocol

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fp8_turbo.engine.core.async_engine import EngineDeadError, EngineShutdownError
from fp8_turbo.engine.serving.protocol import APIError, new_id

logger = logging.getLogger("fp8_turbo")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class ErrorResponse(JSONResponse):
    """An OpenAI error body, always encodable (non-ASCII escaped, whatever a message quotes)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(e: APIError) -> ErrorResponse:
    return ErrorResponse(e.body(), status_code=e.status, headers=e.headers)


def server_error(e: BaseException) -> APIError:
    """What a client sees of an unexpected exception: a 503 when the engine is gone or the server is
    stopping, else a logged 500 whose message carries only the request id."""
    request_id = request_id_var.get()
    if isinstance(e, (EngineDeadError, EngineShutdownError)):
        return APIError(503, str(e), type="server_error", code="service_unavailable", headers={"Retry-After": "1"})
    logger.error("request %s failed", request_id, exc_info=e)
    return APIError(500, f"The server had an error while processing your request (request id {request_id}).",
                    type="server_error", code="internal_error")


class Availability(Protocol):
    active: int  # HTTP requests in flight

    def unavailable(self) -> str | None:
        """Why new requests are refused now (a 503), or None."""


class RequestContextMiddleware:
    """Outermost ASGI middleware: request ids, 503 while unavailable (but /metrics), generic 500s."""

    def __init__(self, app: ASGIApp, availability: Availability):
        self.app, self.availability = app, availability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"")
        request_id = client_id.decode() if _CLIENT_ID.fullmatch(client_id) else new_id("req")
        token = request_id_var.set(request_id)
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        self.availability.active += 1
        try:
            reason = self.availability.unavailable()
            if reason is not None and scope["path"] != "/metrics":
                refusal = APIError(503, reason, type="server_error", code="service_unavailable",
                                   headers={"Retry-After": "1", "Connection": "close"})
                await error_response(refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 -- whatever escaped the app: a generic 500 with the id
            if started:  # the response is under way: it can only be cut short
                logger.error("request %s failed after its response started", request_id, exc_info=e)
            else:
                await error_response(server_error(e))(scope, receive, send_with_id)
        finally:
            self.availability.active -= 1
            request_id_var.reset(token)
