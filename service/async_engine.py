"""The bridge between the asyncio gRPC server and the engine, which runs in its own thread.

::

    asyncio loop                                   engine thread (owns the LLMEngine)
      submit / abort / get_load /
      reset_prefix_cache        ──▶ inbox ──▶  run queued calls, then engine.step()
      RequestStream (per request) ◀── loop.call_soon_threadsafe(one batch per step)

The engine thread sleeps on a condition while it has nothing to run. Everything on the asyncio
side (streams, futures) is touched only by the loop; the engine only by its thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from service.faults import FaultPlan, crash_engine
from service.request_stream import RequestStream

if TYPE_CHECKING:
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine, PreparedRequest

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine does not take requests now: not started, draining, stopped or crashed."""


class RequestIdInUseError(ValueError):
    """A request with this id is already in flight."""


class AsyncLLM:
    """Runs an ``LLMEngine`` in a thread beside the asyncio loop and streams its deltas."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.dead_reason: str | None = None
        self._cond = threading.Condition()
        self._inbox: list[tuple[Callable[[], Any], asyncio.Future[Any] | None]] = []
        self._stopping = False
        self._draining = False
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._idle: asyncio.Event | None = None
        self._on_dead: Callable[[str], None] | None = None
        # Called on the loop once per request that ends: (stream, its last delta or None if the
        # reader left first, which aborts it).
        self.on_request_end: Callable[[RequestStream, RequestOutput | None], None] | None = None
        # Test-only failures (service/faults.py); empty unless the server was started with them.
        self.faults = FaultPlan()
        self.stream_interval = 1  # see ServerArgs.stream_interval

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLM:
        """Load the model and size the KV cache (blocking: call it off the event loop)."""
        from engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(args))

    # ------------------------------------------------------------------ lifecycle (loop side)
    def start(self, on_dead: Callable[[str], None] | None = None) -> None:
        """Start the engine thread; call on the event loop that will read the streams.
        ``on_dead(reason)`` runs on the loop if the engine thread crashes."""
        assert self._thread is None, "already started"
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_dead = on_dead
        self._thread = threading.Thread(target=self._run, name="sluice-engine", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._thread is not None and not (self._draining or self._stopping or self.dead_reason)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def begin_drain(self) -> None:
        """Stop admitting requests; those in flight go on."""
        self._draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            return False
        return True

    async def shutdown(self) -> None:
        """Abort whatever is still in flight (its streams end ABORTED), then stop the thread."""
        self._draining = True
        if self._thread is None:
            return
        if self._streams and not self.dead_reason:
            self.abort(list(self._streams))
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ requests (loop side)
    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                priority: int = 0, cache_salt: str | None = None) -> PreparedRequest:
        """Validate and tokenize without touching engine state; ``ValueError`` names the field."""
        return self.engine.prepare_request(request_id, prompt, params, priority, cache_salt)

    def submit(self, prepared: PreparedRequest) -> RequestStream:
        """Queue a prepared request for the engine and return its stream. Admission happens on
        the engine thread; ``await stream.wait_accepted()`` tells how it went."""
        if not self.accepting:
            raise EngineUnavailableError(self._unavailable_reason())
        if prepared.request_id in self._streams:
            raise RequestIdInUseError(f"request_id {prepared.request_id!r} is already in flight")
        accepted = self._call_in_engine(lambda: self.engine.add_prepared_request(prepared))
        if self.faults.crashes_engine(prepared.request_id):
            self._call_in_engine(crash_engine, want_result=False)
        stream = RequestStream(prepared, accepted, self._close_stream, self.stream_interval)
        self._streams[prepared.request_id] = stream
        assert self._idle is not None
        self._idle.clear()
        accepted.add_done_callback(lambda fut: self._on_admission(stream, fut))
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas; leaving early aborts it."""
        stream = self.submit(self.prepare(request_id, prompt, params, priority, cache_salt))
        try:
            await stream.wait_accepted()
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def abort(self, request_ids: list[str]) -> list[str]:
        """Abort requests by id; their streams end with ``abort`` deltas. Returns the ids that
        were in flight (unknown ids are ignored)."""
        in_flight = [rid for rid in request_ids if rid in self._streams]
        if in_flight and not self.dead_reason:
            self._call_in_engine(lambda: self.engine.abort_request(in_flight), want_result=False)
        return in_flight

    async def get_load(self) -> dict[str, Any]:
        """The engine's load, read on its own thread between steps."""
        return await self._call_between_steps(self.engine.get_load)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block, on the engine thread between steps (the cache is
        the engine thread's alone); requests running now keep their blocks."""
        return await self._call_between_steps(self.engine.reset_prefix_cache)

    def _call_between_steps(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        if self.dead_reason or self._thread is None or self._stopping:
            raise EngineUnavailableError(self._unavailable_reason())
        return self._call_in_engine(fn)

    def _unavailable_reason(self) -> str:
        if self.dead_reason:
            return f"the engine failed: {self.dead_reason}"
        if self._thread is None:
            return "the engine is not started"
        return "the server is draining and takes no new requests"

    def _call_in_engine(self, fn: Callable[[], Any], want_result: bool = True) -> asyncio.Future[Any]:
        assert self._loop is not None
        future = self._loop.create_future()
        with self._cond:
            if self.dead_reason is None:
                self._inbox.append((fn, future if want_result else None))
                self._cond.notify()
                return future
        # The engine thread is gone: nothing would ever run the call.
        if want_result:
            future.set_exception(EngineUnavailableError(self._unavailable_reason()))
        return future

    def _on_admission(self, stream: RequestStream, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            stream.reject()
            self._forget(stream.request_id)

    def _close_stream(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is not stream or stream.finished:
            return
        if self.dead_reason:
            self._forget(stream.request_id)
            return
        if self.on_request_end is not None:
            self.on_request_end(stream, None)
        # The stream keeps its id until the engine's abort comes back, so that a new request
        # with the same id cannot be handed this one's last deltas.
        rid = stream.request_id
        self._call_in_engine(lambda: self.engine.abort_request([rid]), want_result=False)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._streams and self._idle is not None:
            self._idle.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.push(output)
            if stream.finished:
                self._forget(output.request_id)
                if self.on_request_end is not None and not stream.closed:  # a closed one was counted then
                    self.on_request_end(stream, output)

    def _fail_all(self, reason: str) -> None:
        """The engine thread died: every stream ends with an error delta per open choice."""
        for rid, stream in list(self._streams.items()):
            stream.fail(f"the engine failed: {reason}")
            self._forget(rid)
        if self._on_dead is not None:
            self._on_dead(reason)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        # Calls taken from the inbox and not run yet: a failure mid-way must still answer them.
        pending: collections.deque[tuple[Callable[[], Any], asyncio.Future[Any] | None]] = collections.deque()
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping or self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    pending.extend(self._inbox)
                    self._inbox = []
                    stopping = self._stopping
                while pending:
                    self._run_call(*pending.popleft())
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                elif stopping:
                    return
        except Exception as exc:
            logger.exception("the engine thread failed")
            self._die(f"{type(exc).__name__}: {exc}", list(pending))

    def _run_call(self, fn: Callable[[], Any], future: asyncio.Future[Any] | None) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # handed to the caller; the engine goes on
            result, error = None, exc
        if future is not None:
            self._loop.call_soon_threadsafe(_resolve, future, result, error)
        elif error is not None:
            raise error

    def _die(self, reason: str, unrun: list[tuple[Callable[[], Any], asyncio.Future[Any] | None]]) -> None:
        with self._cond:
            self.dead_reason = reason
            inbox, self._inbox = unrun + self._inbox, []
        failure = EngineUnavailableError(f"the engine failed: {reason}")
        for _, future in inbox:
            if future is not None:
                self._loop.call_soon_threadsafe(_resolve, future, None, failure)
        self._loop.call_soon_threadsafe(self._fail_all, reason)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
