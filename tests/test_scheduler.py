"""The token-budget scheduler, driven by a fake runner that keeps a simulated paged KV cache.

The fake runner is an oracle for the block bookkeeping: the KV it writes at a position depends
on the KV it reads back (through the block table) at the position before, and the token it
samples depends on every KV value in the attention window. A block table pointing at a wrong,
reused or released block therefore changes the tokens, which are compared with a direct
computation over the true sequence (``reference_tokens``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from scheduler.block_manager import NULL_BLOCK_ID
from scheduler.config import SchedulerConfig
from scheduler.outputs import RequestUpdate, RunnerOutput, ScheduledRequest, SchedulerOutput
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import QueueFullError, Scheduler

VOCAB = 50


def kv_value(prev_kv: int, token_id: int, position: int) -> int:
    return hash((prev_kv, token_id, position))


def next_token(visible_kv: tuple[int, ...]) -> int:
    return hash(visible_kv) % VOCAB


def window_start(end: int, sliding_window: int | None) -> int:
    """First position the query at ``end - 1`` attends to."""
    return 0 if sliding_window is None else max(0, end - sliding_window)


def reference_tokens(prompt: list[int], num_tokens: int, sliding_window: int | None = None) -> list[int]:
    """What the fake model generates for ``prompt``, computed directly over the true sequence."""
    tokens, kv, out = list(prompt), [], []
    for _ in range(num_tokens):
        for p in range(len(kv), len(tokens)):
            kv.append(kv_value(kv[p - 1] if p else -1, tokens[p], p))
        token = next_token(tuple(kv[window_start(len(kv), sliding_window):]))
        tokens.append(token)
        out.append(token)
    return out


class FakeRunner:
    """Executes a SchedulerOutput against a simulated KV cache of ``num_blocks * block_size``
    slots; ``forced`` scripts the sampled tokens of chosen requests instead."""

    def __init__(self, config: SchedulerConfig, forced: dict[str, list[int]] | None = None) -> None:
        self.block_size = config.block_size
        self.sliding_window = config.sliding_window
        self.kv: list[int | None] = [None] * (config.num_blocks * config.block_size)
        self.forced = forced or {}
        self.steps: list[SchedulerOutput] = []

    def _slot(self, block_table: list[int], position: int) -> int:
        block_id = block_table[position // self.block_size]
        assert block_id != NULL_BLOCK_ID, f"position {position} lies in a released block"
        return block_id * self.block_size + position % self.block_size

    def _read(self, block_table: list[int], position: int) -> int:
        value = self.kv[self._slot(block_table, position)]
        assert value is not None, f"position {position} was never written"
        return value

    def _write_kv(self, sr: ScheduledRequest) -> int:
        """Write the KV of every position the step computes; return the position after them."""
        end = sr.start_position + sr.num_new_tokens
        assert len(sr.block_table) * self.block_size >= end, "block table too short"
        for i, token_id in enumerate(sr.token_ids):
            p = sr.start_position + i
            prev = self._read(sr.block_table, p - 1) if p else -1
            self.kv[self._slot(sr.block_table, p)] = kv_value(prev, token_id, p)
        return end

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.steps.append(scheduler_output)
        sampled: dict[str, list[int]] = {}
        for sr in scheduler_output.scheduled:
            assert sr.num_new_tokens > 0, "nothing to compute, so nothing to sample from"
            end = self._write_kv(sr)
            if not sr.sample:
                continue
            if sr.request_id in self.forced:
                sampled[sr.request_id] = [self.forced[sr.request_id][len(sr.output_token_ids)]]
                continue
            visible = range(window_start(end, self.sliding_window), end)
            sampled[sr.request_id] = [next_token(tuple(self._read(sr.block_table, q) for q in visible))]
        return RunnerOutput(sampled_token_ids=sampled)


def make_config(**overrides: object) -> SchedulerConfig:
    fields: dict = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64, block_size=4,
                        num_blocks=65)
    fields.update(overrides)
    return SchedulerConfig(**fields)


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8, **kwargs: object) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt), max_tokens=max_tokens, **kwargs)


def prompt_of(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31) % VOCAB for i in range(length)]


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    output = scheduler.schedule()
    updates = scheduler.update(output, runner.execute(output))
    scheduler.check_integrity()
    return output, updates


def run_all(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000,
            on_step: Callable[[int, SchedulerOutput], None] | None = None) -> int:
    """Step until every request finished; returns the number of steps."""
    for n in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return n
        output, _ = step(scheduler, runner)
        if on_step is not None:
            on_step(n, output)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


@pytest.fixture
def make_scheduler() -> Iterable[Callable[..., tuple[Scheduler, FakeRunner]]]:
    """Schedulers whose integrity is checked once more after the test."""
    made: list[Scheduler] = []

    def make(forced: dict[str, list[int]] | None = None, **overrides: object) -> tuple[Scheduler, FakeRunner]:
        config = make_config(**overrides)
        made.append(Scheduler(config))
        return made[-1], FakeRunner(config, forced)

    yield make
    for scheduler in made:
        scheduler.check_integrity()


def test_scheduler_import_does_not_load_torch() -> None:
    code = "import sys, scheduler.scheduler; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=True)


def test_outputs_match_the_direct_computation(make_scheduler) -> None:
    scheduler, runner = make_scheduler()
    prompts = {f"r{i}": prompt_of(i, 5 + 3 * i) for i in range(4)}
    requests = [make_request(rid, p, max_tokens=6) for rid, p in prompts.items()]
    for request in requests:
        scheduler.add_request(request)
    run_all(scheduler, runner)
    for request in requests:
        assert request.output_token_ids == reference_tokens(prompts[request.request_id], 6)
        assert request.status == RequestStatus.FINISHED_LENGTH
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


def test_token_budget_is_respected_every_step(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=10, max_num_seqs=4)
    for i in range(6):
        scheduler.add_request(make_request(f"r{i}", prompt_of(i, 7 + i), max_tokens=5))

    def check(_: int, output: SchedulerOutput) -> None:
        assert output.total_num_scheduled_tokens == sum(s.num_new_tokens for s in output.scheduled)
        assert output.total_num_scheduled_tokens <= 10
        assert len(output.scheduled) <= 4

    run_all(scheduler, runner, on_step=check)


def test_chunked_prefill_splits_a_long_prompt(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=8)
    prompt = prompt_of(3, 21)
    request = make_request("long", prompt, max_tokens=3)
    scheduler.add_request(request)
    chunks = []
    for _ in range(3):
        output, updates = step(scheduler, runner)
        (s,) = output.scheduled
        chunks.append((s.start_position, s.token_ids, s.sample))
        assert [u.request_id for u in updates] == (["long"] if s.sample else [])
    assert chunks == [(0, prompt[0:8], False), (8, prompt[8:16], False), (16, prompt[16:21], True)]
    assert request.num_output_tokens == 1  # sampled once, at the end of the prompt
    run_all(scheduler, runner)
    assert request.output_token_ids == reference_tokens(prompt, 3)


def test_prefill_and_decode_of_different_requests_share_a_step(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=16)
    scheduler.add_request(make_request("a", prompt_of(1, 6)))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", prompt_of(2, 30)))
    output, _ = step(scheduler, runner)
    assert [(s.request_id, s.start_position, s.num_new_tokens, s.sample) for s in output.scheduled] == [
        ("a", 6, 1, True),  # decode first
        ("b", 0, 15, False),  # then a prefill chunk with the rest of the budget
    ]


def test_scheduled_request_carries_live_references(make_scheduler) -> None:
    scheduler, runner = make_scheduler()
    request = make_request("a", prompt_of(1, 6))
    scheduler.add_request(request)
    output, _ = step(scheduler, runner)
    (s,) = output.scheduled
    assert s.block_table is scheduler.block_manager.get_block_table("a")
    assert s.prompt_token_ids is request.prompt_token_ids and s.output_token_ids is request.output_token_ids
    assert s.draft_token_ids == []
    assert request.first_scheduled_time is not None
    first = request.first_scheduled_time
    for _ in range(3):
        output, _ = step(scheduler, runner)
        assert output.scheduled[0].block_table is s.block_table
    assert len(s.block_table) == 3  # grown in place: 9 tokens computed, block_size 4
    assert request.first_scheduled_time == first
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used, stats.num_kv_blocks_total) == (
        1, 0, 3, 64)


def test_no_request_starves_under_continuous_arrivals(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_num_seqs=3, max_num_batched_tokens=8, num_blocks=17)
    added: dict[str, int] = {}
    admitted: dict[str, int] = {}
    finished: dict[str, int] = {}
    for n in range(400):
        if n < 100:  # a new request every step, more than the scheduler can serve
            rid = f"r{n}"
            scheduler.add_request(make_request(rid, prompt_of(n, 3 + n % 9), max_tokens=2 + n % 4))
            added[rid] = n
        output, updates = step(scheduler, runner)
        for s in output.scheduled:
            admitted.setdefault(s.request_id, n)
        finished.update((u.request_id, n) for u in updates if u.finish_reason is not None)
        if not scheduler.has_unfinished_requests():
            break
    assert set(finished) == set(added)
    # Admitted in arrival order: nobody overtakes a request that waits, so each wait is bounded
    # by the work that arrived before it.
    assert sorted(admitted, key=admitted.__getitem__) == sorted(added, key=added.__getitem__)
    assert max(finished[rid] - admitted[rid] for rid in added) <= 2 * 8


def test_lower_priority_value_is_served_first(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_num_seqs=1, max_num_batched_tokens=8)
    scheduler.add_request(make_request("busy", prompt_of(0, 4), max_tokens=2))
    step(scheduler, runner)
    for seed, (rid, priority) in enumerate([("low", 5), ("mid", 1), ("high", -3), ("mid2", 1)]):
        scheduler.add_request(make_request(rid, prompt_of(seed, 4), max_tokens=2, priority=priority))
    admitted: list[str] = []

    def record(_: int, output: SchedulerOutput) -> None:
        admitted.extend(s.request_id for s in output.scheduled if s.start_position == 0)

    run_all(scheduler, runner, on_step=record)
    assert admitted == ["high", "mid", "mid2", "low"]


def test_preemption_under_block_pressure_gives_identical_outputs(make_scheduler) -> None:
    prompts = {f"r{i}": prompt_of(i, 6 + 5 * i) for i in range(5)}

    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        scheduler, runner = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=16, max_model_len=48)
        for rid, prompt in prompts.items():
            scheduler.add_request(make_request(rid, prompt, max_tokens=20))
        requests = {rid: scheduler.get_request(rid) for rid in prompts}
        run_all(scheduler, runner)
        assert scheduler.block_manager.num_free_blocks == num_blocks - 1
        return {rid: r.output_token_ids for rid, r in requests.items()}, scheduler.num_preemptions

    plenty, no_preemptions = run(num_blocks=65)
    tight, preemptions = run(num_blocks=13)  # 48 token slots, room for max_model_len only
    assert no_preemptions == 0 and preemptions > 0
    assert tight == plenty
    assert plenty == {rid: reference_tokens(p, 20) for rid, p in prompts.items()}


def test_preemption_picks_the_lowest_priority_newest_request(make_scheduler) -> None:
    scheduler, runner = make_scheduler(num_blocks=9, max_num_batched_tokens=32, max_model_len=32)
    # Four requests of 2 blocks fill the pool of 8; after one decode, three of them need a third.
    scheduler.add_request(make_request("old_low", prompt_of(1, 8), max_tokens=20, priority=1))
    scheduler.add_request(make_request("high", prompt_of(2, 8), max_tokens=20, priority=0))
    scheduler.add_request(make_request("new_low", prompt_of(3, 7), max_tokens=20, priority=1))
    scheduler.add_request(make_request("newest_low", prompt_of(4, 8), max_tokens=20, priority=1))
    output, _ = step(scheduler, runner)
    assert {s.request_id for s in output.scheduled} == {"old_low", "high", "new_low", "newest_low"}
    assert scheduler.block_manager.num_free_blocks == 0
    output, _ = step(scheduler, runner)
    assert output.preempted_request_ids == ["newest_low"]
    newest_low = scheduler.get_request("newest_low")
    assert newest_low.status == RequestStatus.PREEMPTED and newest_low.num_computed_tokens == 0
    assert newest_low.num_preemptions == 1 and newest_low.num_output_tokens == 1
    assert [r.request_id for r in scheduler.waiting] == ["newest_low"]
    run_all(scheduler, runner)
    assert newest_low.output_token_ids == reference_tokens(prompt_of(4, 8), 20)


def test_a_request_preempts_itself_when_it_is_the_newest(make_scheduler) -> None:
    scheduler, runner = make_scheduler(num_blocks=5, max_num_batched_tokens=16, max_model_len=16)
    scheduler.add_request(make_request("a", prompt_of(1, 7), max_tokens=8))
    scheduler.add_request(make_request("b", prompt_of(2, 8), max_tokens=8))
    step(scheduler, runner)  # both hold 2 blocks, the pool of 4 is empty, only b needs a third
    output, _ = step(scheduler, runner)
    assert output.preempted_request_ids == ["b"]
    assert [s.request_id for s in output.scheduled] == ["a"]
    run_all(scheduler, runner)
    assert scheduler.num_preemptions >= 1


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding", "preempted"])
def test_abort_in_every_state_frees_every_block(make_scheduler, state: str) -> None:
    scheduler, runner = make_scheduler(num_blocks=9, max_num_batched_tokens=8, max_model_len=32)
    scheduler.add_request(make_request("a", prompt_of(1, 12), max_tokens=20))
    scheduler.add_request(make_request("b", prompt_of(2, 12), max_tokens=20))
    want = {"waiting": RequestStatus.WAITING, "prefilling": RequestStatus.RUNNING,
            "decoding": RequestStatus.RUNNING, "preempted": RequestStatus.PREEMPTED}[state]
    target = scheduler.get_request("b")
    for _ in range(40):
        if target.status == want and (state != "decoding" or target.num_output_tokens > 0) and (
                state != "prefilling" or target.num_computed_tokens < target.num_prompt_tokens):
            break
        step(scheduler, runner)
    assert target.status == want, f"never reached {state}"
    scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    scheduler.check_integrity()
    assert target.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.get_request("b") is None
    assert "b" not in scheduler.block_manager.holders()
    output, _ = step(scheduler, runner)
    assert "b" in output.finished_request_ids and "b" not in {s.request_id for s in output.scheduled}
    scheduler.finish_requests(["a", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


def test_abort_between_schedule_and_update_drops_the_tokens(make_scheduler) -> None:
    scheduler, runner = make_scheduler()
    scheduler.add_request(make_request("a", prompt_of(1, 5)))
    output = scheduler.schedule()
    runner_output = runner.execute(output)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(output, runner_output) == []
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


def finish_with(tokens: list[int], **request_kwargs: object) -> tuple[Request, list[RequestUpdate]]:
    config = make_config()
    scheduler = Scheduler(config)
    runner = FakeRunner(config, forced={"r": tokens})
    request = make_request("r", [3, 4, 5], **request_kwargs)
    scheduler.add_request(request)
    updates: list[RequestUpdate] = []
    for _ in range(len(tokens)):
        if request.is_finished:
            break
        updates += step(scheduler, runner)[1]
    assert request.is_finished
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks
    return request, updates


def test_stop_token_finishes_with_its_id_as_stop_reason() -> None:
    request, updates = finish_with([7, 8, 9, 10], max_tokens=10, stop_token_ids=frozenset({9}))
    assert request.output_token_ids == [7, 8, 9]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == 9
    assert updates[-1] == RequestUpdate("r", [9], "stop", 9)
    assert [u.new_token_ids for u in updates] == [[7], [8], [9]]


def test_eos_finishes_with_no_stop_reason() -> None:
    request, updates = finish_with([7, 1, 9], max_tokens=10, eos_token_id=1)
    assert request.output_token_ids == [7, 1]
    assert updates[-1] == RequestUpdate("r", [1], "stop", None)


def test_ignore_eos_keeps_generating_to_max_tokens() -> None:
    request, updates = finish_with([1, 1, 1, 1], max_tokens=4, eos_token_id=1, ignore_eos=True)
    assert request.output_token_ids == [1, 1, 1, 1]
    assert updates[-1].finish_reason == "length" and request.status == RequestStatus.FINISHED_LENGTH


def test_ignore_eos_still_honours_stop_token_ids() -> None:
    request, _ = finish_with([1, 2, 3], max_tokens=4, eos_token_id=1, ignore_eos=True,
                             stop_token_ids=frozenset({2}))
    assert request.output_token_ids == [1, 2] and request.stop_reason == 2


def test_min_tokens_defers_stops() -> None:
    request, _ = finish_with([1, 9, 1, 9, 5], max_tokens=10, eos_token_id=1, min_tokens=3,
                             stop_token_ids=frozenset({9}))
    assert request.output_token_ids == [1, 9, 1]  # the third token counts towards min_tokens
    assert request.stop_reason is None


def test_max_tokens_finishes_with_length() -> None:
    request, updates = finish_with([4, 4, 4, 4], max_tokens=3)
    assert request.output_token_ids == [4, 4, 4]
    assert updates[-1] == RequestUpdate("r", [4], "length", None)


def test_max_model_len_finishes_with_length(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_model_len=10)
    request = make_request("r", prompt_of(1, 7), max_tokens=100)
    scheduler.add_request(request)
    run_all(scheduler, runner)
    assert request.num_tokens == 10 and request.status == RequestStatus.FINISHED_LENGTH


def test_stop_among_several_tokens_truncates_the_rest(make_scheduler) -> None:
    scheduler, _ = make_scheduler()
    request = make_request("r", [3, 4, 5], max_tokens=10, stop_token_ids=frozenset({8}))
    scheduler.add_request(request)
    output = scheduler.schedule()
    updates = scheduler.update(output, RunnerOutput({"r": [7, 8, 9, 10]}))
    assert updates == [RequestUpdate("r", [7, 8], "stop", 8)]
    assert request.output_token_ids == [7, 8]
    scheduler.check_integrity()


def test_finished_requests_are_reported_to_the_runner_once(make_scheduler) -> None:
    scheduler, runner = make_scheduler()
    scheduler.add_request(make_request("r", [3, 4, 5], max_tokens=1))
    step(scheduler, runner)
    assert scheduler.schedule().finished_request_ids == ["r"]
    assert scheduler.schedule().finished_request_ids == []


def test_queue_full_error_admits_nothing(make_scheduler) -> None:
    scheduler, runner = make_scheduler(max_waiting_requests=2)
    scheduler.add_request(make_request("a", [1, 2]))
    scheduler.add_request(make_request("b", [1, 2]))
    with pytest.raises(QueueFullError):
        scheduler.add_request(make_request("c", [1, 2]))
    assert scheduler.get_request("c") is None and scheduler.num_waiting == 2
    step(scheduler, runner)  # both admitted: the queue has room again
    scheduler.add_request(make_request("c", [1, 2]))
    run_all(scheduler, runner)


def test_invalid_requests_are_rejected(make_scheduler) -> None:
    scheduler, _ = make_scheduler(max_model_len=16)
    scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.add_request(make_request("b", []))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("c", list(range(17))))
    assert scheduler.get_num_unfinished_requests() == 1


def test_config_rejects_a_pool_too_small_for_one_sequence() -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        make_config(max_model_len=64, num_blocks=16)  # 15 usable blocks of 4 = 60 slots
    make_config(max_model_len=60, num_blocks=16)
    # A sliding window bounds what one request holds, so a long max_model_len fits a small pool.
    make_config(max_model_len=1000, num_blocks=16, sliding_window=8, max_num_batched_tokens=16)


def test_sliding_window_releases_blocks_and_matches_the_windowed_computation(make_scheduler) -> None:
    window = 6
    scheduler, runner = make_scheduler(sliding_window=window, max_model_len=200, num_blocks=9,
                                       max_num_batched_tokens=8, max_num_seqs=2)
    prompts = {"a": prompt_of(1, 21), "b": prompt_of(2, 9)}
    for rid, prompt in prompts.items():
        scheduler.add_request(make_request(rid, prompt, max_tokens=40))
    requests = {rid: scheduler.get_request(rid) for rid in prompts}
    most_held = 0

    def check(_: int, output: SchedulerOutput) -> None:
        nonlocal most_held
        for s in output.scheduled:
            if not s.block_table:
                continue  # finished: its table was emptied
            nc = s.start_position  # released blocks were judged before this step's tokens
            released = [i for i, b in enumerate(s.block_table) if b == NULL_BLOCK_ID]
            assert released == list(range(max(0, (nc - window) // 4)))
        most_held = max(most_held, 8 - scheduler.block_manager.num_free_blocks)

    run_all(scheduler, runner, on_step=check)
    for rid, prompt in prompts.items():
        assert requests[rid].output_token_ids == reference_tokens(prompt, 40, sliding_window=window)
    # 61 and 49 tokens through a pool of 8 blocks of 4, without a preemption.
    assert scheduler.num_preemptions == 0 and most_held <= 8
