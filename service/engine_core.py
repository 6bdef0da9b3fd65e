"""Where the engine runs for the server: a thread of the server's process, or a process of its own.

::

    AsyncLLM (asyncio loop)          EngineThread                  EngineProcess
      send((call id, name, args)) ─▶ inbox + condition  ─── or ──▶ pipe ─▶ child process
      handlers.deliver / reply / ◀── the engine thread   ◀── or ─── pipe ◀─ (reader thread)
      dead (each on the engine's
      side; AsyncLLM moves them
      onto its loop)

Both run ``run_engine_loop``: the calls queued since the last step (``add_prepared_request``,
``abort_request``, ``get_load``, ``reset_prefix_cache``; ``crash`` for the fault tests), then one
engine step while requests are unfinished, its outputs handed over in one batch. Every
LOG_STATS_INTERVAL_S while requests run, it logs the engine's load and where the loop's time went
(``LoopStats``; ``EngineArgs.disable_log_stats`` turns it off). In its own
process the engine holds a GIL of its own: the server's process can spend its time on gRPC
messages (one per token per stream) without delaying the next step, which is what the default
buys under load.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import operator
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from service.faults import crash_engine

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine, RequestPreparer
    from engine.model_config import ModelConfig
    from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# (call id, or None when no answer is wanted; the engine method; its arguments)
Call = tuple[int | None, str, tuple[Any, ...]]
ENGINE_CALLS = frozenset({"add_prepared_request", "abort_request", "get_load", "reset_prefix_cache", "crash"})
PROCESS_START_TIMEOUT_S = 600.0  # loading a large model from a slow disk


@dataclass(frozen=True)
class EngineHandlers:
    """What the engine's side hands back, called on the engine's thread (or the reader thread)."""

    deliver: Callable[[list[RequestOutput]], None]
    reply: Callable[[int, Any, BaseException | None], None]
    dead: Callable[[str], None]


@dataclass(frozen=True)
class EngineInfo:
    """What the service reads about the engine: fixed once it is loaded."""

    model_config: ModelConfig
    vocab_size: int
    cache_info: dict[str, object]
    preparer: RequestPreparer

    @property
    def tokenizer(self) -> Tokenizer:
        return self.preparer.tokenizer

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        return cls(engine.model_config, engine.vocab_size, engine.cache_info(), engine.preparer)


LOG_STATS_INTERVAL_S = 10.0  # as vLLM's server; $SLUICE_LOG_STATS_INTERVAL (seconds) overrides it


class LoopStats:
    """Where the engine loop's time went since its last report: how many steps, and per step the
    model's step (``engine.step``: scheduling, the forward pass, sampling, detokenizing), handing
    the outputs to the server, and taking and running the server's calls; the rest of the interval
    the loop waited for work. ``report`` gives it, with the engine's load, once ``interval_s`` has
    passed since the last report, if a step ran."""

    def __init__(self, interval_s: float, now: float) -> None:
        self.interval_s = interval_s
        self._reset(now)

    def _reset(self, now: float) -> None:
        self.since, self.steps, self.calls_s, self.step_s, self.deliver_s = now, 0, 0.0, 0.0, 0.0

    def add(self, calls_s: float, step_s: float, deliver_s: float) -> None:
        self.steps += 1
        self.calls_s += calls_s
        self.step_s += step_s
        self.deliver_s += deliver_s

    def report(self, engine: Any, now: float) -> str | None:
        elapsed = now - self.since
        if elapsed < self.interval_s or not self.steps:
            return None
        load = engine.get_load()
        busy = self.calls_s + self.step_s + self.deliver_s
        ms = 1000 / self.steps
        used = load["kv_blocks_used"] / load["kv_blocks_total"] if load["kv_blocks_total"] else 0.0
        line = (f"engine loop: {self.steps} step{'s' * (self.steps != 1)} in {elapsed:.1f} s, "
                f"{busy * ms:.2f} ms a step (model step {self.step_s * ms:.2f}, outputs {self.deliver_s * ms:.2f}, "
                f"calls {self.calls_s * ms:.2f}), "
                f"waited {elapsed - busy:.2f} s; running {load['num_running']}, waiting {load['num_waiting']}; "
                f"KV cache {100 * used:.1f}% used; generation {load['generation_tokens_per_s']:.1f} tok/s; "
                f"prefix cache hit rate {100 * load['prefix_cache_hit_rate']:.1f}%")
        self._reset(now)
        return line


def log_stats_interval(args: EngineArgs | None) -> float:
    """The stats interval of an engine with these arguments (0: none): LOG_STATS_INTERVAL_S, or
    ``$SLUICE_LOG_STATS_INTERVAL`` seconds where set."""
    if args is None or args.disable_log_stats:
        return 0.0
    value = os.environ.get("SLUICE_LOG_STATS_INTERVAL", "")
    if not value:
        return LOG_STATS_INTERVAL_S
    try:
        interval = float(value)
    except ValueError:
        interval = -1.0
    if not interval > 0:
        raise ValueError(f"SLUICE_LOG_STATS_INTERVAL must be a number of seconds > 0, got {value!r}")
    return interval


def run_engine_loop(engine: Any, take_calls: Callable[[bool], tuple[list[Call], bool]],
                    reply: Callable[[int, Any, BaseException | None], None],
                    deliver: Callable[[list[RequestOutput]], None], log_stats_interval_s: float = 0.0) -> None:
    """Run calls and steps until asked to stop with nothing unfinished. ``take_calls(block)``
    returns the calls queued since it was last asked and whether to stop; it waits for one when
    ``block`` (nothing to step). An exception from a step, or from a call that wants no answer,
    ends the loop (the engine is then unusable). With ``log_stats_interval_s`` > 0, ``LoopStats``
    are logged that often while steps run."""
    pending: collections.deque[Call] = collections.deque()
    stopping = False
    stats = LoopStats(log_stats_interval_s, time.perf_counter()) if log_stats_interval_s > 0 else None
    while True:
        block = not (stopping or engine.has_unfinished_requests())
        start = time.perf_counter()
        calls, stop = take_calls(block)
        if block:  # the wait for work is not the calls' time
            start = time.perf_counter()
        stopping |= stop
        pending.extend(calls)
        while pending:
            call_id, name, args = pending.popleft()
            try:
                result, error = (crash_engine() if name == "crash" else getattr(engine, name)(*args)), None
            except Exception as exc:  # handed to the caller; the engine goes on
                result, error = None, exc
            if call_id is not None:
                reply(call_id, result, error)
            elif error is not None:
                raise error
        if engine.has_unfinished_requests():
            step_start = time.perf_counter()
            outputs = engine.step()
            deliver_start = time.perf_counter()
            if outputs:
                deliver(outputs)
            if stats is not None:
                now = time.perf_counter()
                stats.add(step_start - start, deliver_start - step_start, now - deliver_start)
                line = stats.report(engine, now)
                if line is not None:
                    logger.info(line)
        elif stopping:
            return


def _check_call(call: Call) -> None:
    assert call[1] in ENGINE_CALLS, f"not an engine call: {call[1]!r}"


class EngineThread:
    """The engine in a thread of this process, sleeping on a condition while it has nothing to run."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._stats_interval = log_stats_interval(getattr(engine, "args", None))
        self._cond = threading.Condition()
        self._inbox: list[Call] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._info: EngineInfo | None = None

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            self._info = EngineInfo.of(self.engine)
        return self._info

    def start(self, handlers: EngineHandlers) -> None:
        self._thread = threading.Thread(target=self._run, args=(handlers,), name="sluice-engine", daemon=True)
        self._thread.start()

    def send(self, call: Call) -> None:
        _check_call(call)
        with self._cond:
            self._inbox.append(call)
            self._cond.notify()

    def stop(self) -> None:
        """Finish once no request is unfinished."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _take_calls(self, block: bool) -> tuple[list[Call], bool]:
        with self._cond:
            while block and not (self._inbox or self._stopping):
                self._cond.wait()
            calls, self._inbox = self._inbox, []
            return calls, self._stopping

    def _run(self, handlers: EngineHandlers) -> None:
        try:
            run_engine_loop(self.engine, self._take_calls, handlers.reply, handlers.deliver, self._stats_interval)
        except Exception as exc:
            logger.exception("the engine thread failed")
            handlers.dead(f"{type(exc).__name__}: {exc}")


class EngineProcess:
    """The engine in a child process (spawned: CUDA cannot be forked), fed through one pipe and
    answering through another. The child ignores SIGINT/SIGTERM (the server drains, then tells
    it to stop) and exits when the server's process goes away."""

    def __init__(self, process: multiprocessing.process.BaseProcess, calls: Connection, answers: Connection,
                 info: EngineInfo) -> None:
        self.info = info
        self._process = process
        self._calls = calls
        self._answers = answers
        self._outbox: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @classmethod
    def launch(cls, args: EngineArgs, log_format: str = "text") -> EngineProcess:
        """Start the child and wait until its engine is loaded (blocking); raise ``RuntimeError``
        with the child's reason if it fails to load."""
        from engine.tokenizer import Tokenizer

        context = multiprocessing.get_context("spawn")
        calls_recv, calls_send = context.Pipe(duplex=False)
        answers_recv, answers_send = context.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        process = context.Process(target=_child_main, name="sluice-engine",
                                  args=(args, calls_recv, answers_send, level, log_format), daemon=True)
        process.start()
        calls_recv.close()
        answers_send.close()
        if not answers_recv.poll(PROCESS_START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"the engine process did not load the model within {PROCESS_START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = answers_recv.recv()
        except EOFError:
            process.join()
            raise RuntimeError(f"the engine process exited with code {process.exitcode} while loading") from None
        if kind != "ready":
            process.join()
            raise RuntimeError(f"the engine process failed to load: {payload}")
        model_config, vocab_size, cache_info, preparer = payload
        # The tokenizer is read here rather than sent: the child's is the same file.
        preparer.tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
        logger.info("engine process %d: model loaded", process.pid)
        return cls(process, calls_send, answers_recv, EngineInfo(model_config, vocab_size, cache_info, preparer))

    def start(self, handlers: EngineHandlers) -> None:
        self._threads = [threading.Thread(target=self._write, name="sluice-engine-calls", daemon=True),
                         threading.Thread(target=self._read, args=(handlers,), name="sluice-engine-outputs",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def send(self, call: Call) -> None:
        """Queue a call; a writer thread sends it, so the loop never waits on a full pipe."""
        _check_call(call)
        self._outbox.put(call)

    def stop(self) -> None:
        self._outbox.put(None)

    def join(self) -> None:
        self._process.join()
        for thread in self._threads:
            thread.join()

    def _write(self) -> None:
        while True:
            call = self._outbox.get()
            try:
                self._calls.send(call)
            except OSError:  # the child is gone; the reader reports it
                return
            if call is None:
                return

    def _read(self, handlers: EngineHandlers) -> None:
        try:
            while True:
                kind, *rest = self._answers.recv()
                if kind == "out":
                    handlers.deliver(unpack_outputs(rest[0]))
                elif kind == "reply":
                    handlers.reply(*rest)
                elif kind == "dead":
                    handlers.dead(rest[0])
                    return
                else:  # "stopped"
                    return
        except (EOFError, OSError):
            self._process.join(timeout=10)
            handlers.dead(f"the engine process exited with code {self._process.exitcode}")
        finally:
            self._outbox.put(None)  # let the writer finish


class _ServerGone(Exception):
    """The server's process closed the pipe: nobody is left to serve."""


def _child_main(args: EngineArgs, calls: Connection, answers: Connection, level: int, log_format: str) -> None:
    from engine.llm_engine import LLMEngine
    from service.log_format import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(level, log_format)
    try:
        stats_interval = log_stats_interval(args)
        engine = LLMEngine.from_engine_args(args)
    except Exception as exc:
        logger.exception("loading the model failed")
        answers.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    info = EngineInfo.of(engine)
    preparer = _without_tokenizer(info.preparer)
    answers.send(("ready", (info.model_config, info.vocab_size, info.cache_info, preparer)))
    stopping = False

    def send(message: tuple) -> None:
        try:
            answers.send(message)
        except OSError:  # BrokenPipeError: the server's process is gone
            raise _ServerGone from None

    def take_calls(block: bool) -> tuple[list[Call], bool]:
        nonlocal stopping
        taken: list[Call] = []
        timeout = None if block else 0
        while calls.poll(timeout):
            try:
                call = calls.recv()
            except EOFError:
                raise _ServerGone from None
            if call is None:
                stopping = True
            else:
                taken.append(call)
            timeout = 0
        return taken, stopping

    try:
        run_engine_loop(engine, take_calls,
                        lambda call_id, result, error: send(("reply", call_id, result, _portable(error))),
                        lambda outputs: send(("out", pack_outputs(outputs))), stats_interval)
        send(("stopped",))
    except _ServerGone:
        logger.warning("the server's process went away: the engine process exits")
    except Exception as exc:
        logger.exception("the engine failed")
        with contextlib.suppress(OSError):
            answers.send(("dead", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


def _without_tokenizer(preparer: RequestPreparer) -> RequestPreparer:
    return replace(preparer, tokenizer=None)


def _portable(error: BaseException | None) -> BaseException | None:
    """The error as sent across the pipe: itself when it survives pickling, else a RuntimeError
    with its text (the service maps errors by type: ValueError, QueueFullError, ...)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------- outputs on the pipe
# Tuples of plain values pickle several times faster than slotted dataclasses; a step of 256
# requests is one message. The prompt is not sent back: the server has it.
_COMPLETION_FIELDS = CompletionOutput.__slots__
_METRICS_FIELDS = RequestMetrics.__slots__
_completion_values = operator.attrgetter(*_COMPLETION_FIELDS)
_metrics_values = operator.attrgetter(*_METRICS_FIELDS)


def pack_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    return [(o.request_id, [_completion_values(c) for c in o.outputs], o.finished, o.num_cached_tokens,
             None if o.metrics is None else _metrics_values(o.metrics), o.error) for o in outputs]


def unpack_outputs(packed: list[tuple]) -> list[RequestOutput]:
    return [RequestOutput(request_id, None, [], [CompletionOutput(*c) for c in completions], finished,
                          num_cached_tokens, None if metrics is None else RequestMetrics(*metrics), error)
            for request_id, completions, finished, num_cached_tokens, metrics, error in packed]
