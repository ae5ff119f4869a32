"""How the server starts, drains and stops; what happens when the engine loop dies.

- Start-up: before it says it is serving, the server runs one token through the engine
  (`check_engine`); if that fails, it logs why and exits 1 (a server that cannot compute must not
  answer /health 200 over failing requests).
- SIGTERM or SIGINT: new requests get a 503 (`Connection: close`, so load balancers move on) and
  /health says 503; requests in flight may finish for up to `--shutdown-timeout` seconds. Then every
  stream still open ends with an error event and `data: [DONE]`, every other request gets a 503,
  and the process exits 0. A second signal stops at once.
- The engine loop died: every pending request has failed at once (a 500), /health and new requests
  get a 503, and the process exits 1 so that a supervisor restarts it.
- A connection whose request headers do not arrive within `--header-timeout` seconds is closed
  (uvicorn itself waits forever); bodies have `--body-timeout` (see body.py).
- At most `--max-connections` connections are served at once: one past that is answered, as soon
  as its request's headers arrive, with an OpenAI-shaped 503, `Retry-After` and `Connection: close`
  (and closed after 2 s if they do not arrive), so slow or idle clients cannot hold every file
  descriptor and every body buffer of the process.
"""
from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from fp8_turbo.engine.core.async_engine import AsyncLLMEngine, EngineShutdownError
from fp8_turbo.engine.serving.protocol import APIError, new_id
from fp8_turbo.engine.serving.request_context import REQUEST_ID_HEADER, error_response

logger = logging.getLogger("fp8_turbo")

_FLUSH_TIMEOUT = 5.0  # seconds for ended requests to send their last bytes
_UVICORN_GRACE = 5  # uvicorn's own wait for connections once we are done (they should all be gone)
_OVER_CAPACITY_HEADER_TIMEOUT = 2.0  # seconds a connection past --max-connections may take to send its headers
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about connections refused


def check_engine(engine) -> bool:
    """One greedy token through the loaded engine; False (the error logged) when it cannot compute."""
    try:
        engine.self_test()
    except Exception as e:  # noqa: BLE001 -- whatever broke, the server must not start
        logger.critical("the engine cannot compute: a one-token forward at start-up failed with %s: %s; exiting",
                        type(e).__name__, e, exc_info=e)
        return False
    return True


class Lifecycle:
    """Serving -> draining -> stopped, or dead. The request middleware counts `active` requests and asks
    `unavailable()`; the uvicorn server below calls `drain()` or `after_engine_death()` and exits with
    `exit_code`."""

    def __init__(self, aengine: AsyncLLMEngine, shutdown_timeout: float = 30.0):
        self.aengine = aengine
        self.shutdown_timeout = shutdown_timeout
        self.active = 0  # HTTP requests in flight
        self.draining = False
        self.exit_code = 0

    def unavailable(self) -> str | None:
        if self.aengine.errored is not None:
            return "the engine failed; the server is restarting"
        if self.draining:
            return "the server is shutting down"
        return None

    async def drain(self) -> None:
        """Refuse new requests, let those in flight finish for `shutdown_timeout` s, then end the rest."""
        self.draining = True
        logger.info("shutting down: %d requests in flight, waiting up to %g s", self.active, self.shutdown_timeout)
        t0 = time.monotonic()
        if not await self._wait_idle(self.shutdown_timeout):
            logger.warning("ending %d requests still in flight after %g s", self.active, self.shutdown_timeout)
            self.aengine.close(lambda: EngineShutdownError("the server is shutting down"))
            await self._wait_idle(_FLUSH_TIMEOUT)
        logger.info("drained in %.2f s", time.monotonic() - t0)

    async def after_engine_death(self) -> None:
        """The pending requests have failed already: let their answers out, then exit non-zero."""
        self.exit_code = 1
        await self._wait_idle(_FLUSH_TIMEOUT)
        logger.critical("the engine loop died: exiting with status %d", self.exit_code)

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.active > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


class GracefulServer(uvicorn.Server):
    """uvicorn, with the drain and engine-death handling of `Lifecycle` run before its own shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._signalled = False
        self._stopping: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded for uvicorn to re-raise after serving: the process would die of SIGTERM (143), not exit 0.
        if self._signalled:  # a second signal: stop now
            self.should_exit = self.force_exit = True
        self._signalled = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._stopping is None:
            if self.lifecycle.aengine.errored is not None:
                self._stopping = asyncio.create_task(self.lifecycle.after_engine_death())
            elif self._signalled:
                self._stopping = asyncio.create_task(self.lifecycle.drain())
        return self._stopping is not None and self._stopping.done()


def h11_with_header_timeout(timeout: float, max_connections: int | None = None,
                            retry_after: int = 1) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with the header timeout and the connection cap described above."""
    over_capacity = _over_capacity_app(max_connections, retry_after) if max_connections is not None else None

    class H11WithHeaderTimeout(H11Protocol):
        """Closes a connection whose next request's headers have not all arrived `timeout` s after it opened
        (or after its first bytes, on a kept-alive connection); answers 503 on one past `max_connections`."""

        _header_timer: asyncio.TimerHandle | None = None
        _timeout = timeout

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if over_capacity is not None and len(self.connections) > max_connections:
                self.app = over_capacity  # this connection's requests (one: it is closed after the answer)
                self._timeout = min(timeout, _OVER_CAPACITY_HEADER_TIMEOUT)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():
                self._arm()
            super().data_received(data)
            if not self._between_requests():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(self._timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request headers in %g s", self._timeout)
                self.transport.close()

    return H11WithHeaderTimeout


def _over_capacity_app(max_connections: int, retry_after: int):
    """The ASGI app that answers a request on a connection past the cap (the server's app never sees it)."""
    last_log = [float("-inf")]
    refused = [0]

    async def app(scope: dict[str, Any], receive, send) -> None:
        refused[0] += 1
        now = time.monotonic()
        if now - last_log[0] >= _REFUSAL_LOG_INTERVAL:
            logger.warning("%d connections over --max-connections %d refused with 503", refused[0], max_connections)
            last_log[0], refused[0] = now, 0
        refusal = APIError(503, f"the server has {max_connections} connections open, its limit; retry after "
                                f"{retry_after} s", type="server_error", code="too_many_connections",
                           headers={"Retry-After": str(retry_after), "Connection": "close",
                                    REQUEST_ID_HEADER: new_id("req")})
        await error_response(refusal)(scope, receive, send)
    return app


def uvicorn_config(app, *, header_timeout: float, max_connections: int | None = None, retry_after: int = 1,
                   **options) -> uvicorn.Config:
    options.setdefault("timeout_graceful_shutdown", _UVICORN_GRACE)
    return uvicorn.Config(app, http=h11_with_header_timeout(header_timeout, max_connections, retry_after), **options)


def serve(app, *, host: str, port: int, header_timeout: float, max_connections: int | None = None,
          retry_after: int = 1, log_level: str = "info") -> int:
    """Serve `app` (from `build_app`) until a signal or the engine's death; the process exit status."""
    lifecycle: Lifecycle = app.state.lifecycle
    config = uvicorn_config(app, header_timeout=header_timeout, max_connections=max_connections,
                            retry_after=retry_after, host=host, port=port, log_level=log_level)
    GracefulServer(config, lifecycle).run()
    return lifecycle.exit_code
