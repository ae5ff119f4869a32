"""The asyncio face of the engine: many concurrent callers, one engine loop (continuous batching).

`generate()` yields a RequestOutput per step in which its request progressed. Engine steps run in a
worker thread so the event loop keeps serving connections; requests are added and aborted only
between steps, by the loop itself, so the engine is never touched from two threads at once.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from engine.core.llm_engine import LLMEngine
from engine.core.outputs import RequestOutput
from engine.sampling.params import SamplingParams

logger = logging.getLogger("fp8_turbo")


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can run."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams, str | None]] = []
        self._pending_aborts: set[str] = set()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.errored: BaseException | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop(), name="engine-loop")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    # ---- requests -------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Leaving the loop early (a client gone) aborts it."""
        if self.errored is not None:
            raise EngineDeadError(f"the engine loop failed: {self.errored!r}")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.check_request(prompt_token_ids, params)  # bad requests fail here, synchronously
        self.start()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append((request_id, prompt_token_ids, params, prompt))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort at the next step boundary; the request's KV blocks are freed then."""
        self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    # ---- the loop -------------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for request_id, ids, params, prompt in adds:
            if request_id in self._pending_aborts:
                continue
            try:
                self.engine.add_request(request_id, ids, params, prompt)
            except Exception as e:  # checked before queueing; anything left fails this request only
                self._deliver(request_id, e)
        for request_id in self._pending_aborts:
            self.engine.abort_request(request_id)
        self._pending_aborts.clear()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    async def _run_loop(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                if not self._pending_adds and not self._pending_aborts:
                    await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:
                # A failing step fails the requests in it, not the server: abort them all and go on.
                logger.exception("engine step failed; failing %d running requests", len(self.engine.requests))
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            await asyncio.sleep(0)  # let handlers run between steps
