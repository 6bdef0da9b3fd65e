"""Asynchronous scheduling (``EngineArgs.async_scheduling``): a step is scheduled before the
previous step's tokens are known, with placeholder inputs the runner fills on the device. The
oracle is the same engine scheduling synchronously: every request's tokens, text and finish
reason must be identical, and the scheduler consistent after every step."""

from __future__ import annotations

import random
from pathlib import Path

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

SETTINGS = dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=24, max_num_seqs=16, max_model_len=96)


def _run(path: Path, requests: list[tuple[list[int], SamplingParams]], *, async_scheduling: bool,
         abort_at: dict[int, str] | None = None) -> tuple[dict[str, tuple], LLMEngine, int]:
    engine = LLMEngine(EngineArgs(model=str(path), async_scheduling=async_scheduling, **SETTINGS))
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    results: dict[str, tuple] = {}
    tokens: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            tokens.setdefault(out.request_id, []).extend(c.token_ids)
            text[out.request_id] = text.get(out.request_id, "") + c.text
            if out.finished:
                results[out.request_id] = (tokens[out.request_id], text[out.request_id], c.finish_reason)
        engine.scheduler.check_integrity()
        steps += 1
        if abort_at and steps in abort_at:
            engine.abort_request(abort_at[steps])
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    return results, engine, steps


def _workload(seed: int, vocab: int = 512) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(12):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 30))
        if i % 4 == 1:
            params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[rng.randrange(2, vocab)])
        out.append((prompt, params))
    return out


def test_async_equals_sync_with_preemption_chunking_and_stops(tiny_models) -> None:
    work = _workload(0)
    sync, _, _ = _run(tiny_models["llama"], work, async_scheduling=False)
    asynchronous, engine, _ = _run(tiny_models["llama"], work, async_scheduling=True)
    assert asynchronous == sync
    assert engine.scheduler.stats().num_preemptions > 0  # 40 blocks of 4 tokens for 12 requests


def test_stop_strings_end_the_same_way(tiny_models) -> None:
    """A stop string is found after the next step was scheduled: its token is computed and dropped."""
    path = tiny_models["qwen3"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    probe, _, _ = _run(path, [([5, 6, 7], greedy)], async_scheduling=False)
    text = probe["r0"][1]
    stop = text[len(text) // 3: len(text) // 3 + 2]
    work = [([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))] * 3
    sync, _, _ = _run(path, work, async_scheduling=False)
    asynchronous, _, _ = _run(path, work, async_scheduling=True)
    assert asynchronous == sync
    assert all(reason == "stop" for _, _, reason in sync.values())


def test_requests_needing_their_last_token_run_synchronously(tiny_models) -> None:
    """Penalties, seeds and logprobs read the latest token: while such a request is unfinished
    the engine drains the step in flight and runs synchronous steps; the results match."""
    work = _workload(1)
    work[3] = (work[3][0], SamplingParams(temperature=0.8, seed=7, max_tokens=12))
    work[6] = (work[6][0], SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=12))
    work[8] = (work[8][0], SamplingParams(temperature=0.0, logprobs=2, max_tokens=5))
    sync, _, _ = _run(tiny_models["mistral"], work, async_scheduling=False)
    asynchronous, engine, _ = _run(tiny_models["mistral"], work, async_scheduling=True)
    assert asynchronous == sync
    assert engine._num_sync_only == 0


def test_abort_while_a_step_is_in_flight(tiny_models) -> None:
    work = _workload(2)
    results, engine, _ = _run(tiny_models["qwen2"], work, async_scheduling=True, abort_at={3: "r0", 5: "r4"})
    assert results["r0"][2] == "abort" and results["r4"][2] == "abort"
    assert len(results) == len(work)
    assert not engine.has_unfinished_requests()
