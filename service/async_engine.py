"""The bridge between the asyncio gRPC server and the engine, which runs in a thread of its own
or in a process of its own (service/engine_core.py)::

    asyncio loop                                   engine (EngineThread or EngineProcess)
      submit / abort / get_load /
      reset_prefix_cache   ──▶ (call id, name, args) ──▶  run queued calls, then engine.step()
      RequestStream (per request) ◀── one batch of outputs per step, moved onto the loop

Everything on the asyncio side (streams, futures) is touched only by the loop; the engine only
by its own thread or process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from service.engine_core import Call, EngineHandlers, EngineInfo, EngineProcess, EngineThread
from service.faults import FaultPlan
from service.request_stream import RequestStream

if TYPE_CHECKING:
    from collections.abc import Callable

    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine, PreparedRequest

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine does not take requests now: not started, draining, stopped or crashed."""


class RequestIdInUseError(ValueError):
    """A request with this id is already in flight."""


class AsyncLLM:
    """Runs an engine beside the asyncio loop (in a thread, or a process of its own) and
    streams its deltas."""

    def __init__(self, engine: LLMEngine | EngineThread | EngineProcess) -> None:
        self.core = engine if isinstance(engine, (EngineThread, EngineProcess)) else EngineThread(engine)
        self.dead_reason: str | None = None
        self._started = False
        self._stopping = False
        self._draining = False
        self._streams: dict[str, RequestStream] = {}
        self._futures: dict[int, asyncio.Future[Any]] = {}  # calls the engine has yet to answer
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._on_dead: Callable[[str], None] | None = None
        # Called on the loop once per request that ends: (stream, its last delta or None if the
        # reader left first, which aborts it).
        self.on_request_end: Callable[[RequestStream, RequestOutput | None], None] | None = None
        # Test-only failures (service/faults.py); empty unless the server was started with them.
        self.faults = FaultPlan()
        self.stream_interval = 1  # see ServerArgs.stream_interval

    @classmethod
    def from_engine_args(cls, args: EngineArgs, engine_process: bool = False, log_format: str = "text") -> AsyncLLM:
        """Load the model (blocking: call it off the event loop), in this process or, with
        ``engine_process``, in a child process of its own."""
        if engine_process:
            return cls(EngineProcess.launch(args, log_format))
        from engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(args))

    @property
    def engine(self) -> Any:
        """The engine object when it runs in this process (tests and the offline paths)."""
        assert isinstance(self.core, EngineThread), "the engine runs in its own process"
        return self.core.engine

    @property
    def info(self) -> EngineInfo:
        """The model's configuration, vocabulary, tokenizer and KV-cache settings."""
        return self.core.info

    # ------------------------------------------------------------------ lifecycle (loop side)
    def start(self, on_dead: Callable[[str], None] | None = None) -> None:
        """Start the engine's loop; call on the event loop that will read the streams.
        ``on_dead(reason)`` runs on the loop if the engine fails."""
        assert not self._started, "already started"
        self._started = True
        self._loop = loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_dead = on_dead
        self.core.start(EngineHandlers(
            deliver=lambda outputs: loop.call_soon_threadsafe(self._deliver, outputs),
            reply=lambda call_id, result, error: loop.call_soon_threadsafe(self._resolve, call_id, result, error),
            dead=lambda reason: loop.call_soon_threadsafe(self._die, reason),
        ))

    @property
    def accepting(self) -> bool:
        return self._started and not (self._draining or self._stopping or self.dead_reason)

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
        """Abort whatever is still in flight (its streams end ABORTED), then stop the engine."""
        self._draining = True
        if not self._started or self._stopping:
            return
        if self._streams and not self.dead_reason:
            self.abort(list(self._streams))
        self._stopping = True
        self.core.stop()
        await asyncio.to_thread(self.core.join)

    # ------------------------------------------------------------------ requests (loop side)
    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                priority: int = 0, cache_salt: str | None = None) -> PreparedRequest:
        """Validate and tokenize without touching engine state; ``ValueError`` names the field."""
        if isinstance(self.core, EngineThread):
            return self.core.engine.prepare_request(request_id, prompt, params, priority, cache_salt)
        return self.core.info.preparer.prepare(request_id, prompt, params, priority, cache_salt)

    def submit(self, prepared: PreparedRequest) -> RequestStream:
        """Queue a prepared request for the engine and return its stream. Admission happens on
        the engine's loop; ``await stream.wait_accepted()`` tells how it went."""
        if not self.accepting:
            raise EngineUnavailableError(self._unavailable_reason())
        if prepared.request_id in self._streams:
            raise RequestIdInUseError(f"request_id {prepared.request_id!r} is already in flight")
        accepted = self._call("add_prepared_request", prepared)
        if self.faults.crashes_engine(prepared.request_id):
            self._call("crash", want_result=False)
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
            self._call("abort_request", in_flight, want_result=False)
        return in_flight

    async def get_load(self) -> dict[str, Any]:
        """The engine's load, read on its own thread between steps."""
        return await self._call_between_steps("get_load")

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block, in the engine's loop between steps (the cache is
        the loop's alone); requests running now keep their blocks."""
        return await self._call_between_steps("reset_prefix_cache")

    def _call_between_steps(self, name: str) -> asyncio.Future[Any]:
        if self.dead_reason or not self._started or self._stopping:
            raise EngineUnavailableError(self._unavailable_reason())
        return self._call(name)

    def _unavailable_reason(self) -> str:
        if self.dead_reason:
            return f"the engine failed: {self.dead_reason}"
        if not self._started:
            return "the engine is not started"
        return "the server is draining and takes no new requests"

    def _call(self, name: str, *args: Any, want_result: bool = True) -> asyncio.Future[Any]:
        """Queue ``engine.name(*args)`` for the engine's loop; its answer resolves the future."""
        assert self._loop is not None
        future = self._loop.create_future()
        if self.dead_reason is not None:  # nothing would ever run the call
            if want_result:
                future.set_exception(EngineUnavailableError(self._unavailable_reason()))
            return future
        call_id = next(self._call_ids) if want_result else None
        if call_id is not None:
            self._futures[call_id] = future
        call: Call = (call_id, name, args)
        self.core.send(call)
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
        self._call("abort_request", [stream.request_id], want_result=False)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._streams and self._idle is not None:
            self._idle.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.prompt_token_ids is not stream.prompt_token_ids:  # from the engine's process
                output.prompt, output.prompt_token_ids = stream.prompt, stream.prompt_token_ids
            stream.push(output)
            if stream.finished:
                self._forget(output.request_id)
                if self.on_request_end is not None and not stream.closed:  # a closed one was counted then
                    self.on_request_end(stream, output)

    def _resolve(self, call_id: int, result: Any, error: BaseException | None) -> None:
        future = self._futures.pop(call_id, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _die(self, reason: str) -> None:
        """The engine failed: calls it had not answered fail, and every stream ends with an
        error delta per open choice."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        failure = EngineUnavailableError(f"the engine failed: {reason}")
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(failure)
        for rid, stream in list(self._streams.items()):
            stream.fail(f"the engine failed: {reason}")
            self._forget(rid)
        if self._on_dead is not None:
            self._on_dead(reason)
