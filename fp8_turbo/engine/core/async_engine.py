"""The asyncio face of the engine: many concurrent callers, one engine loop (continuous batching).

`add_request()` queues a request at once (so admission errors come before any response is sent) and
`stream()` follows it; `generate()` does both. Engine steps run in one dedicated thread (the same
thread every step: its CPU thread team stays warm) so the event loop keeps serving connections. That
thread steps for as long as there is work: between two steps it applies the queued adds and aborts
(under a lock: the event loop queues them), so the next step starts at once, without a round trip
through the event loop. A step's outputs are posted to the event loop when the next step's forward
starts (`LLMEngine.on_forward`): the streams write the previous token while the next one is computed
(the native CPU step releases the GIL), and do not hold the GIL while that step is scheduled. Only that
thread touches the engine's requests.

A step that raises fails the requests in the engine and the loop goes on: one bad step is the step's
fault. `MAX_FAILED_STEPS` failing in a row (with other requests each time) are the engine's: it cannot
compute, and the loop dies. So does a fatal error (`FATAL_ERRORS`: the engine's state can no longer be
trusted) or anything escaping the loop: `errored` is set, every pending request fails at once, and new
requests get `EngineDeadError` (the server answers /health 503 and exits non-zero).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.core.outputs import RequestOutput
from fp8_turbo.engine.core.workers import TensorParallelError
from fp8_turbo.engine.sampling.params import SamplingParams

logger = logging.getLogger("fp8_turbo")


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can run."""


class EngineShutdownError(RuntimeError):
    """The request was ended because the server is shutting down."""


class FatalEngineError(RuntimeError):
    """Raised by engine code whose state can no longer be trusted: the engine loop stops for good."""


# A device error (CUDA's sticky errors, a device-side assert) leaves the context unusable; a dead or
# out-of-step tensor-parallel worker leaves the model unusable.
FATAL_ERRORS: tuple[type[BaseException], ...] = (FatalEngineError, MemoryError, TensorParallelError) + (
    (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ())


MAX_FAILED_STEPS = 3  # consecutive failing steps after which the engine counts as broken


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams, str | None]] = []
        self._pending_aborts: set[str] = set()
        self._pending_seqs = self._pending_tokens = 0  # of _pending_adds
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self._failed_steps = 0  # in a row
        self.errored: BaseException | None = None
        self._stepper: ThreadPoolExecutor | None = None  # the one thread engine steps run on
        self._pending_lock = threading.Lock()  # _pending_adds/_pending_aborts: queued here, applied by the stepper
        self._halted = False  # set by stop(): the stepper returns after its current step
        self._event_loop: asyncio.AbstractEventLoop | None = None  # the loop the streams live on

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None and self.errored is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop(), name="engine-loop")

    async def stop(self) -> None:
        self._halted = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        if self._stepper is not None:
            self._stepper.shutdown(wait=False)
            self._stepper = None
        self.close(lambda: EngineShutdownError("the server is shutting down"))

    def close(self, make_error: Callable[[], BaseException]) -> None:
        """Refuse new requests (EngineShutdownError) and end the running ones with `make_error()`."""
        self._closed = True
        self.fail_all(make_error)

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences queued and not started: added here but not yet in the engine, or waiting there."""
        return self._pending_seqs + len(self.engine.scheduler.waiting)

    @property
    def num_waiting_tokens(self) -> int:
        return self._pending_tokens + self.engine.scheduler.num_waiting_tokens

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue a request now (raises for a dead engine, a duplicate id or a request that cannot run);
        follow it with `stream()`, or `release()` it if it will not be followed."""
        if self.errored is not None:
            raise EngineDeadError(f"the engine loop failed: {self.errored!r}")
        if self._closed:
            raise EngineShutdownError("the server is shutting down")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.check_request(prompt_token_ids, params)  # bad requests fail here, synchronously
        self.start()
        self._queues[request_id] = asyncio.Queue()
        with self._pending_lock:
            self._pending_adds.append((request_id, prompt_token_ids, params, prompt))
            self._pending_seqs += params.n
            self._pending_tokens += params.n * len(prompt_token_ids)
        self._wakeup.set()

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of a request queued by `add_request`. Leaving the loop early (a client gone) aborts it."""
        queue = self._queues[request_id]
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

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request: `add_request` then `stream`."""
        self.add_request(request_id, prompt_token_ids, params, prompt)
        async for out in self.stream(request_id):
            yield out

    def release(self, request_id: str) -> None:
        """Forget a queued request that nobody follows any more (a response that never started); idempotent."""
        if self._queues.pop(request_id, None) is not None:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort at the next step boundary; the request's KV blocks are freed then."""
        with self._pending_lock:
            self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """End every request now: each follower raises `make_error()`; the engine drops them at the next step."""
        for request_id in list(self._queues):
            self._deliver(request_id, make_error())
            self.abort(request_id)

    # ---- the loop ----------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        """Add and abort what was queued (in the stepping thread, between steps); an add that fails
        fails its stream."""
        with self._pending_lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, set()
            self._pending_seqs = self._pending_tokens = 0
        failed = []
        for request_id, ids, params, prompt in adds:
            if request_id in aborts:
                continue
            try:
                self.engine.add_request(request_id, ids, params, prompt)
            except Exception as e:  # checked before queueing; anything left fails this request only
                failed.append((request_id, e))
        for request_id in aborts:
            self.engine.abort_request(request_id)
        self._post(failed)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            self._deliver(request_id, item)

    async def _run_loop(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 -- the loop is dead whatever killed it: say so everywhere
            logger.critical("the engine loop died; failing %d requests", len(self._queues), exc_info=e)
            self.errored = e
            with self._pending_lock:
                self._pending_adds.clear()
                self._pending_seqs = self._pending_tokens = 0
            self.fail_all(lambda: RuntimeError(f"the engine loop failed: {e!r}"))

    async def _loop(self) -> None:
        loop = self._event_loop = asyncio.get_running_loop()
        while True:
            if not (self._pending_adds or self._pending_aborts or self.engine.has_unfinished_requests()):
                self._wakeup.clear()  # add_request and abort set it, on this thread: no wake-up is lost
                await self._wakeup.wait()
                continue
            if self._stepper is None:
                self._stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp8-turbo-engine")
            await loop.run_in_executor(self._stepper, self._steps)

    def _steps(self) -> None:
        """In the stepping thread: apply what was queued, step, post the outputs to the event loop;
        again while the engine has requests. A step's outputs are posted when the next step starts
        computing (LLMEngine.on_forward), or when the stepping stops. Raises what must end the engine loop."""
        held: list[tuple[str, RequestOutput | BaseException]] = []

        def flush() -> None:
            nonlocal held
            items, held = held, []
            self._post(items)

        self.engine.on_forward = flush
        try:
            while not self._halted:
                self._apply_pending()
                if not self.engine.has_unfinished_requests():
                    return
                try:
                    outputs = self.engine.step()
                except FATAL_ERRORS:
                    raise
                except Exception as e:
                    # A failing step fails the requests in it, not the server: abort them all and go
                    # on, unless the steps keep failing whatever they run.
                    self._failed_steps += 1
                    logger.exception("engine step failed (%d in a row); failing %d running requests",
                                     self._failed_steps, len(self.engine.requests))
                    failed = list(self.engine.requests)
                    for request_id in failed:
                        self.engine.abort_request(request_id)
                    held += [(request_id, e) for request_id in failed]
                    flush()
                    if self._failed_steps >= MAX_FAILED_STEPS:
                        raise FatalEngineError(f"{self._failed_steps} engine steps in a row failed, the last with {e!r}") from e
                    continue
                self._failed_steps = 0
                flush()  # the step may have scheduled nothing (then on_forward was not called)
                held = [(out.request_id, out) for out in outputs]
        finally:
            self.engine.on_forward = None
            flush()

    def _post(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams, from the stepping thread (the event loop delivers them)."""
        if items:
            try:
                self._event_loop.call_soon_threadsafe(self._deliver_all, items)
            except RuntimeError:  # the event loop closed (shutdown): nobody follows these streams
                pass
