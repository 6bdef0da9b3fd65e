"""Faults at the bridge between the asyncio loop and the engine thread, against the scripted engine
of tests/test_service_bridge.py: a request id reused right after its request was abandoned, and an
engine thread that dies with calls still queued for it."""

from __future__ import annotations

import asyncio

import pytest

from engine.sampling_params import SamplingParams
from service.async_engine import AsyncLLM, EngineUnavailableError, RequestIdInUseError
from service.faults import FaultPlan, InjectedFault
from tests.test_service_bridge import ScriptedEngine


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_an_abandoned_id_stays_taken_until_its_abort_is_back() -> None:
    engine = ScriptedEngine(step_seconds=0.005)

    async def main() -> list[tuple[list[int], str | None]]:
        llm = AsyncLLM(engine)
        llm.start()
        old = llm.submit(llm.prepare("r", "p", SamplingParams(max_tokens=10_000)))
        await old.wait_accepted()
        await old.__anext__()
        old.close()  # the reader leaves; the engine holds the request until it runs the abort
        with pytest.raises(RequestIdInUseError):
            llm.submit(llm.prepare("r", "p", SamplingParams(max_tokens=5)))
        assert await llm.wait_idle(5)
        deltas = [(c.token_ids, c.finish_reason) async for d in llm.generate("r", "p", SamplingParams(max_tokens=5))
                  for c in d.outputs]
        await llm.shutdown()
        return deltas

    deltas = _run(main())
    # The new request got only its own deltas: five tokens and "length", nothing of the old abort.
    assert sum(len(tokens) for tokens, _ in deltas) == 5
    assert [reason for _, reason in deltas if reason] == ["length"]


def test_calls_queued_when_the_engine_thread_dies_are_answered() -> None:
    dead: list[str] = []

    async def main() -> None:
        llm = AsyncLLM(ScriptedEngine())
        llm.faults = FaultPlan(crash_engine_ids=frozenset({"boom"}))
        llm.start(on_dead=dead.append)
        # One inbox batch: an admission, the crash, then a second admission and a load query.
        boom = llm.submit(llm.prepare("boom", "p", SamplingParams(max_tokens=5)))
        after = llm.submit(llm.prepare("after", "p", SamplingParams(max_tokens=5)))
        load = llm.get_load()
        with pytest.raises(EngineUnavailableError):
            await after.wait_accepted()
        with pytest.raises(EngineUnavailableError):
            await load
        await boom.wait_accepted()
        assert [c.finish_reason async for d in boom for c in d.outputs] == ["error"]
        with pytest.raises(EngineUnavailableError):
            await llm.get_load()
        assert llm.num_in_flight == 0
        await llm.shutdown()

    _run(main())
    assert dead == [f"{InjectedFault.__name__}: injected engine crash"]


def test_fault_plan_reads_its_variable_and_names_a_bad_entry() -> None:
    plan = FaultPlan.parse(" fail-request=a, crash-engine=b ,fail-request=c,")
    assert plan.fail_request_ids == {"a", "c"} and plan.crash_engine_ids == {"b"}
    assert plan.crashes_engine("b") and not plan.crashes_engine("a")
    with pytest.raises(InjectedFault):
        plan.check_delta("a")
    plan.check_delta("b")
    assert not FaultPlan.parse(None) and not FaultPlan.parse(" ")
    for bad in ("fail-request", "explode=a", "crash-engine="):
        with pytest.raises(ValueError, match="SLUICE_FAULT_INJECT"):
            FaultPlan.parse(bad)
