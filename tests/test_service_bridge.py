"""AsyncLLM, the bridge between the asyncio loop and the engine thread, against a scripted engine
whose every step is known (the end-to-end tests run the real engine behind a real server)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest

from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from scheduler.scheduler import QueueFullError
from service.async_engine import AsyncLLM, EngineUnavailableError


@dataclass(slots=True)
class _Prepared:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [1])
    prompt: str | None = None


@dataclass
class ScriptedEngine:
    """Each request emits token ids 0, 1, ..., max_tokens - 1, one per step per choice."""

    step_seconds: float = 0.001
    fail_at_step: int | None = None
    max_requests: int | None = None
    steps: int = 0
    polls: int = 0
    active: dict[str, list[int]] = field(default_factory=dict)  # request id -> tokens left per choice
    aborted_at_step: dict[str, int] = field(default_factory=dict)
    emitted: dict[tuple[str, int], int] = field(default_factory=dict)  # (request id, choice) -> count
    cache_salts: dict[str, str | None] = field(default_factory=dict)
    resets: list[tuple[int, int]] = field(default_factory=list)  # (thread id, steps so far) per reset
    _aborted: list[RequestOutput] = field(default_factory=list)

    def prepare_request(self, request_id: str, prompt: object, params: SamplingParams,
                        priority: int = 0, cache_salt: str | None = None) -> _Prepared:
        self.cache_salts[request_id] = cache_salt
        return _Prepared(request_id, params)

    def add_prepared_request(self, prepared: _Prepared) -> None:
        if self.max_requests is not None and len(self.active) >= self.max_requests:
            raise QueueFullError("full")
        self.active[prepared.request_id] = [prepared.params.max_tokens] * prepared.params.n

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            left = self.active.pop(rid, None)
            if left is not None:
                self.aborted_at_step[rid] = self.steps
                outs = [CompletionOutput(i, "", [], finish_reason="abort") for i, n in enumerate(left) if n]
                self._aborted.append(RequestOutput(rid, None, [1], outs, finished=True))

    def has_unfinished_requests(self) -> bool:
        self.polls += 1
        return bool(self.active or self._aborted)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("device lost")
        time.sleep(self.step_seconds)
        outputs, self._aborted = self._aborted, []
        for rid, left in list(self.active.items()):
            outs = []
            for i, n in enumerate(left):
                if n:
                    token = self.emitted.get((rid, i), 0)
                    self.emitted[(rid, i)] = token + 1
                    left[i] -= 1
                    outs.append(CompletionOutput(i, f"<{token}>", [token],
                                                 finish_reason=None if left[i] else "length"))
            if not any(left):
                del self.active[rid]
            outputs.append(RequestOutput(rid, None, [1], outs, finished=not any(left)))
        return outputs

    def get_load(self) -> dict[str, int]:
        return {"num_running": len(self.active)}

    def reset_prefix_cache(self) -> bool:
        self.resets.append((threading.get_ident(), self.steps))
        return True


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def _started(engine: ScriptedEngine, on_dead=None) -> AsyncLLM:
    llm = AsyncLLM(engine)
    llm.start(on_dead=on_dead)
    return llm


def test_slow_reader_gets_coalesced_deltas_with_every_token() -> None:
    async def main() -> list[RequestOutput]:
        llm = await _started(ScriptedEngine())
        deltas = []
        async for delta in llm.generate("r", "p", SamplingParams(max_tokens=40)):
            deltas.append(delta)
            await asyncio.sleep(0.05)  # far slower than a 1 ms step
        await llm.shutdown()
        return deltas

    deltas = _run(main())
    tokens = [t for d in deltas for t in d.outputs[0].token_ids]
    assert tokens == list(range(40))
    assert "".join(d.outputs[0].text for d in deltas) == "".join(f"<{t}>" for t in range(40))
    assert len(deltas) < 20, "deltas were not coalesced"
    assert max(len(d.outputs[0].token_ids) for d in deltas) > 1
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_n_choices_are_coalesced_per_index() -> None:
    async def main() -> dict[int, list[int]]:
        llm = await _started(ScriptedEngine())
        tokens: dict[int, list[int]] = {}
        async for delta in llm.generate("r", "p", SamplingParams(max_tokens=10, n=3)):
            for c in delta.outputs:
                tokens.setdefault(c.index, []).extend(c.token_ids)
            await asyncio.sleep(0.02)
        await llm.shutdown()
        return tokens

    assert _run(main()) == {i: list(range(10)) for i in range(3)}


def test_leaving_the_stream_aborts_within_one_step() -> None:
    engine = ScriptedEngine(step_seconds=0.005)

    async def main() -> int:
        llm = await _started(engine)
        async for _ in llm.generate("r", "p", SamplingParams(max_tokens=10_000)):
            break
        steps_at_exit = engine.steps
        await asyncio.sleep(0.2)
        assert llm.num_in_flight == 0
        await llm.shutdown()
        return steps_at_exit

    steps_at_exit = _run(main())
    assert "r" not in engine.active
    assert engine.aborted_at_step["r"] <= steps_at_exit + 1


def test_abort_by_id_ends_the_stream_aborted() -> None:
    async def main() -> list[str | None]:
        llm = await _started(ScriptedEngine())
        reasons = []
        async for delta in llm.generate("r", "p", SamplingParams(max_tokens=10_000)):
            if not reasons:
                assert llm.abort(["r", "unknown"]) == ["r"]
            reasons.append(delta.outputs[0].finish_reason)
        await llm.shutdown()
        return reasons

    reasons = _run(main())
    assert reasons[-1] == "abort" and reasons[:-1] == [None] * (len(reasons) - 1)


def test_full_queue_rejects_before_acceptance() -> None:
    async def main() -> None:
        llm = await _started(ScriptedEngine(max_requests=1, step_seconds=0.01))
        first = llm.submit(_Prepared("a", SamplingParams(max_tokens=1000)))
        await first.wait_accepted()
        second = llm.submit(_Prepared("b", SamplingParams(max_tokens=10)))
        with pytest.raises(QueueFullError):
            await second.wait_accepted()
        assert llm.num_in_flight == 1
        first.close()
        await llm.shutdown()

    _run(main())


def test_engine_crash_fails_in_flight_requests_and_marks_dead() -> None:
    dead: list[str] = []

    async def main() -> list[RequestOutput]:
        llm = await _started(ScriptedEngine(fail_at_step=5), on_dead=dead.append)
        streams = [llm.submit(_Prepared(f"r{i}", SamplingParams(max_tokens=1000, n=2))) for i in range(3)]
        finals = []
        for stream in streams:
            await stream.wait_accepted()
            async for delta in stream:
                finals.append(delta)
        with pytest.raises(EngineUnavailableError):
            llm.submit(_Prepared("late", SamplingParams()))
        await llm.shutdown()
        return finals

    finals = _run(main())
    assert dead == ["RuntimeError: device lost"]
    ends = {(d.request_id, c.index): (c.finish_reason, d.error) for d in finals for c in d.outputs
            if c.finish_reason is not None}
    assert set(ends) == {(f"r{i}", j) for i in range(3) for j in range(2)}
    assert all(reason == "error" and "device lost" in error for reason, error in ends.values())


def test_idle_engine_thread_sleeps() -> None:
    engine = ScriptedEngine()

    async def main() -> int:
        llm = await _started(engine)
        async for _ in llm.generate("r", "p", SamplingParams(max_tokens=3)):
            pass
        polls = engine.polls
        await asyncio.sleep(0.3)
        idle_polls = engine.polls - polls
        await llm.shutdown()
        return idle_polls

    assert _run(main()) <= 2


def test_drain_refuses_new_requests_and_waits_for_in_flight() -> None:
    async def main() -> None:
        llm = await _started(ScriptedEngine(step_seconds=0.002))
        stream = llm.submit(_Prepared("r", SamplingParams(max_tokens=50)))
        await stream.wait_accepted()
        llm.begin_drain()
        with pytest.raises(EngineUnavailableError, match="draining"):
            llm.submit(_Prepared("late", SamplingParams()))
        assert not await llm.wait_idle(0.0)
        tokens = [t async for d in stream for t in d.outputs[0].token_ids]
        assert tokens == list(range(50))
        assert await llm.wait_idle(1.0)
        await llm.shutdown()

    _run(main())


def test_engine_runs_off_the_event_loop_thread() -> None:
    engine = ScriptedEngine()
    seen: set[int] = set()
    step = engine.step

    def recording_step() -> list[RequestOutput]:
        seen.add(threading.get_ident())
        return step()

    engine.step = recording_step  # type: ignore[method-assign]

    async def main() -> int:
        llm = await _started(engine)
        async for _ in llm.generate("r", "p", SamplingParams(max_tokens=3)):
            pass
        await llm.shutdown()
        return threading.get_ident()

    loop_thread = _run(main())
    assert seen and loop_thread not in seen


def test_reset_prefix_cache_runs_on_the_engine_thread_between_steps_of_a_running_stream() -> None:
    engine = ScriptedEngine(step_seconds=0.002)
    step_threads: set[int] = set()
    step = engine.step

    def recording_step() -> list[RequestOutput]:
        step_threads.add(threading.get_ident())
        return step()

    engine.step = recording_step  # type: ignore[method-assign]

    async def main() -> tuple[list[int], int]:
        llm = await _started(engine)
        tokens: list[int] = []
        async for delta in llm.generate("r", "p", SamplingParams(max_tokens=200), cache_salt="tenant-a"):
            if not tokens:
                assert await llm.reset_prefix_cache() is True
                assert llm.num_in_flight == 1
            tokens.extend(delta.outputs[0].token_ids)
        await llm.shutdown()
        return tokens, threading.get_ident()

    tokens, loop_thread = _run(main())
    assert tokens == list(range(200))
    assert engine.cache_salts == {"r": "tenant-a"}
    ((reset_thread, steps_before),) = engine.resets
    assert step_threads == {reset_thread} and reset_thread != loop_thread
    assert 0 < steps_before < 200  # between two steps of the running request


def test_reset_prefix_cache_after_shutdown_is_unavailable() -> None:
    async def main() -> None:
        llm = await _started(ScriptedEngine())
        await llm.shutdown()
        with pytest.raises(EngineUnavailableError):
            await llm.reset_prefix_cache()

    _run(main())
