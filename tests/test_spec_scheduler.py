"""The scheduler with draft tokens: verify steps of 1 + k tokens, rollback of rejected drafts,
stops inside an accepted run, preemption mid-speculation, and the prefix cache.

The runner is ``test_scheduler``'s fake paged-KV model, verifying drafts greedily: the token it
would sample after each of the last k + 1 positions, read back through the block table, with the
drafts accepted while they agree. Whatever the drafts, every output must equal the direct
computation over the true sequence (``reference_tokens``), so a rolled-back position whose stale
KV was read, or a cached block holding a rejected draft's KV, changes the tokens and fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from scheduler.config import SchedulerConfig, cdiv
from scheduler.outputs import RequestUpdate, RunnerOutput, SchedulerOutput
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler
from tests.test_scheduler import (
    VOCAB,
    FakeRunner,
    make_config,
    make_request,
    next_token,
    prompt_of,
    reference_tokens,
    window_start,
)

Proposer = Callable[[Request], list[int]]


class VerifyingRunner(FakeRunner):
    """Writes every scheduled position's KV, then for a sampled request returns the accepted
    drafts and the model's token at the first disagreement (or the bonus after the last draft).
    ``forced`` scripts a request's model output instead (its i-th output token)."""

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.steps.append(scheduler_output)
        sampled: dict[str, list[int]] = {}
        accepted: dict[str, int] = {}
        for sr in scheduler_output.scheduled:
            end = self._write_kv(sr)  # asserts the table holds a slot for every draft too
            if not sr.sample:
                continue
            drafts = sr.draft_token_ids
            assert sr.token_ids[len(sr.token_ids) - len(drafts):] == drafts
            tokens: list[int] = []
            for j in range(len(drafts) + 1):
                if sr.request_id in self.forced:
                    target = self.forced[sr.request_id][len(sr.output_token_ids) + j]
                else:
                    query_end = end - len(drafts) + j
                    visible = range(window_start(query_end, self.sliding_window), query_end)
                    target = next_token(tuple(self._read(sr.block_table, q) for q in visible))
                tokens.append(target)
                if j == len(drafts) or target != drafts[j]:
                    break
            sampled[sr.request_id] = tokens
            accepted[sr.request_id] = len(tokens) - 1
        return RunnerOutput(sampled_token_ids=sampled, num_accepted_draft_tokens=accepted)


def propose_all(scheduler: Scheduler, propose: Proposer, k: int) -> None:
    """What the engine does between steps: drafts for every running request about to decode."""
    for request in scheduler.running:
        if request.num_computed_tokens == request.num_tokens - 1:
            request.spec_token_ids = propose(request)[:k]


def spec_step(scheduler: Scheduler, runner: VerifyingRunner, propose: Proposer | None = None, k: int = 4
              ) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    if propose is not None:
        propose_all(scheduler, propose, k)
    output = scheduler.schedule()
    scheduler.check_integrity()  # with the drafts in flight
    updates = scheduler.update(output, runner.execute(output))
    scheduler.check_integrity()
    return output, updates


def spec_run_all(scheduler: Scheduler, runner: VerifyingRunner, propose: Proposer, k: int = 4,
                 on_step: Callable[[SchedulerOutput], None] | None = None, max_steps: int = 2000) -> int:
    for n in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return n
        output, _ = spec_step(scheduler, runner, propose, k)
        if on_step is not None:
            on_step(output)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def truth_proposer(truths: dict[str, list[int]], wrong_every: int = 0, seed: int = 0) -> Proposer:
    """Drafts from the true continuation; with ``wrong_every`` > 0, about one draft in
    ``wrong_every`` is replaced by a wrong token."""
    rng = random.Random(seed)

    def propose(request: Request) -> list[int]:
        upcoming = truths[request.request_id][request.num_output_tokens :][:8]
        return [(t + 1) % VOCAB if wrong_every and rng.randrange(wrong_every) == 0 else t for t in upcoming]

    return propose


def bad_proposer(truths: dict[str, list[int]]) -> Proposer:
    """Every draft wrong: each verify step rejects its first draft."""
    return lambda request: [(t + 7) % VOCAB for t in truths[request.request_id][request.num_output_tokens :][:8]]


def decode_one(scheduler: Scheduler, runner: VerifyingRunner, request: Request) -> None:
    """Admit ``request`` and step (without drafts) until it decodes."""
    scheduler.add_request(request)
    while request.num_computed_tokens != request.num_tokens - 1 or request.num_output_tokens == 0:
        spec_step(scheduler, runner)


@pytest.fixture
def make_spec_scheduler() -> Callable[..., tuple[Scheduler, VerifyingRunner]]:
    made: list[Scheduler] = []

    def make(forced: dict[str, list[int]] | None = None, **overrides: object) -> tuple[Scheduler, VerifyingRunner]:
        config: SchedulerConfig = make_config(**overrides)
        made.append(Scheduler(config))
        return made[-1], VerifyingRunner(config, forced)

    yield make
    for scheduler in made:
        scheduler.check_integrity()


def test_a_verify_step_computes_the_last_token_and_the_drafts(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler()
    request = make_request("a", prompt_of(1, 6), max_tokens=20)
    decode_one(scheduler, runner, request)
    last = request.output_token_ids[-1]
    request.spec_token_ids = [11, 12, 13]
    output = scheduler.schedule()
    (s,) = output.scheduled
    assert (s.start_position, s.token_ids, s.draft_token_ids, s.sample) == (6, [last, 11, 12, 13], [11, 12, 13], True)
    assert output.total_num_scheduled_tokens == 4
    # KV slots for positions 6..9: three blocks of 4.
    assert len(s.block_table) == 3 == cdiv(10, 4)
    assert request.num_computed_tokens == 10
    scheduler.check_integrity()


def test_full_acceptance_appends_every_draft_and_the_bonus(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler()
    prompt = prompt_of(2, 5)
    truth = reference_tokens(prompt, 30)
    request = make_request("a", prompt, max_tokens=30)
    decode_one(scheduler, runner, request)
    before = request.num_output_tokens
    _, updates = spec_step(scheduler, runner, truth_proposer({"a": truth}), k=3)
    assert updates == [RequestUpdate("a", truth[before : before + 4])]
    assert request.num_computed_tokens == request.num_tokens - 1  # the bonus token has no KV yet
    assert (request.num_draft_tokens, request.num_accepted_draft_tokens) == (3, 3)
    assert request.spec_token_ids == []


def test_partial_acceptance_rolls_back_to_the_correction(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler()
    prompt = prompt_of(3, 7)
    truth = reference_tokens(prompt, 30)
    request = make_request("a", prompt, max_tokens=30)
    decode_one(scheduler, runner, request)
    n = request.num_output_tokens
    num_tokens = request.num_tokens
    wrong = (truth[n + 2] + 1) % VOCAB
    request.spec_token_ids = [truth[n], truth[n + 1], wrong, truth[n + 3]]
    output, updates = spec_step(scheduler, runner)
    assert updates == [RequestUpdate("a", truth[n : n + 3])]  # two accepted, then the correction
    assert request.num_computed_tokens == num_tokens + 2
    # The next step recomputes from the correction's position, over the rejected drafts' slots.
    output, _ = spec_step(scheduler, runner)
    (s,) = output.scheduled
    assert (s.start_position, s.token_ids) == (num_tokens + 2, [truth[n + 2]])
    assert request.output_token_ids == truth[: request.num_output_tokens]
    stats = scheduler.stats().spec_decode
    assert (stats.num_verify_steps, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 4, 2)


def test_stop_token_inside_an_accepted_run_truncates_it(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(forced={"a": [7, 8, 9, 10, 11, 12]})
    request = make_request("a", [3, 4, 5], max_tokens=10, stop_token_ids=frozenset({9}))
    decode_one(scheduler, runner, request)
    request.spec_token_ids = [8, 9, 10, 11]  # all four agree with the model
    _, updates = spec_step(scheduler, runner)
    assert updates == [RequestUpdate("a", [8, 9], "stop", 9)]
    assert request.output_token_ids == [7, 8, 9] and request.status == RequestStatus.FINISHED_STOPPED
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


def test_eos_inside_an_accepted_run_waits_for_min_tokens(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(forced={"a": [7, 1, 8, 1, 9, 1]})
    request = make_request("a", [3, 4, 5], max_tokens=10, eos_token_id=1, min_tokens=3)
    decode_one(scheduler, runner, request)
    request.spec_token_ids = [1, 8, 1, 9]
    _, updates = spec_step(scheduler, runner)
    # The EOS at output 2 counts towards min_tokens; the one at output 4 stops.
    assert updates == [RequestUpdate("a", [1, 8, 1], "stop", None)]


def test_max_tokens_reached_inside_an_accepted_run_finishes_with_length(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(forced={"a": list(range(20, 40))})
    request = make_request("a", [3, 4, 5], max_tokens=4)
    decode_one(scheduler, runner, request)
    assert scheduler.max_num_draft_tokens(request) == 2  # 3 tokens left: 2 drafts + the bonus
    request.spec_token_ids = [21, 22, 23, 24]
    output, updates = spec_step(scheduler, runner)
    assert output.scheduled[0].draft_token_ids == [21, 22]
    assert updates == [RequestUpdate("a", [21, 22, 23], "length", None)]
    assert request.output_token_ids == [20, 21, 22, 23]


def test_drafts_never_reach_past_max_model_len(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(max_model_len=12, forced={"a": list(range(20, 40))})
    request = make_request("a", prompt_of(4, 9), max_tokens=100)
    decode_one(scheduler, runner, request)  # 10 tokens: room for 2 more
    request.spec_token_ids = [21, 22, 23]
    output, updates = spec_step(scheduler, runner)
    (s,) = output.scheduled
    assert s.draft_token_ids == [21] and s.start_position + s.num_new_tokens <= 12
    assert updates == [RequestUpdate("a", [21, 22], "length", None)] and request.num_tokens == 12


def test_drafts_take_only_budget_the_other_requests_leave(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(max_num_batched_tokens=6, max_num_seqs=3)
    requests = [make_request(f"r{i}", prompt_of(i, 2), max_tokens=20) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    spec_step(scheduler, runner)  # three prefills of 2 tokens: every request now decodes
    for request in requests:
        request.spec_token_ids = [1, 2, 3, 4]
    output = scheduler.schedule()
    assert [(s.request_id, s.num_new_tokens, len(s.draft_token_ids)) for s in output.scheduled] == [
        ("r0", 4, 3), ("r1", 1, 0), ("r2", 1, 0)]
    assert output.total_num_scheduled_tokens == 6
    scheduler.update(output, runner.execute(output))
    scheduler.check_integrity()


def test_drafts_never_preempt_anyone(make_spec_scheduler) -> None:
    # a and b hold 2 blocks each of a pool of 5: a's drafts take the free block; b's get only
    # the slot left in its own blocks, rather than preempting anyone.
    scheduler, runner = make_spec_scheduler(num_blocks=6, max_model_len=20)
    a, b = make_request("a", prompt_of(1, 6), max_tokens=9), make_request("b", prompt_of(2, 6), max_tokens=9)
    scheduler.add_request(a)
    scheduler.add_request(b)
    spec_step(scheduler, runner)
    assert scheduler.block_manager.num_free_blocks == 1
    a.spec_token_ids, b.spec_token_ids = [1, 2, 3], [1, 2, 3]
    output = scheduler.schedule()
    assert output.preempted_request_ids == []
    assert [(s.request_id, s.draft_token_ids) for s in output.scheduled] == [("a", [1, 2, 3]), ("b", [1])]
    assert scheduler.block_manager.num_free_blocks == 0
    scheduler.update(output, runner.execute(output))
    scheduler.check_integrity()


def test_preemption_mid_speculation_drops_the_drafts(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(num_blocks=9, max_num_batched_tokens=32, max_model_len=32)
    prompts = {"old": prompt_of(1, 8), "high": prompt_of(2, 8), "new": prompt_of(3, 7), "newest": prompt_of(4, 8)}
    truths = {rid: reference_tokens(p, 40) for rid, p in prompts.items()}
    for priority, (rid, prompt) in zip([1, 0, 1, 1], prompts.items()):
        scheduler.add_request(make_request(rid, prompt, max_tokens=20, priority=priority))
    spec_step(scheduler, runner)  # four requests of 2 blocks fill the pool of 8
    newest = scheduler.get_request("newest")
    propose_all(scheduler, truth_proposer(truths), 4)
    assert newest.spec_token_ids
    output = scheduler.schedule()
    assert "newest" in output.preempted_request_ids
    assert newest.status == RequestStatus.PREEMPTED and newest.spec_token_ids == []
    assert newest.num_computed_tokens == 0 and "newest" not in {s.request_id for s in output.scheduled}
    scheduler.check_integrity()
    scheduler.update(output, runner.execute(output))
    scheduler.check_integrity()
    requests = {rid: scheduler.get_request(rid) for rid in prompts}
    spec_run_all(scheduler, runner, truth_proposer(truths, wrong_every=3))
    for rid, request in requests.items():
        assert request.output_token_ids == truths[rid][:20]


def test_only_verified_blocks_enter_the_prefix_cache(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(block_size=4)
    prompt = prompt_of(5, 6)
    truth = reference_tokens(prompt, 30)
    a = make_request("a", prompt, max_tokens=12)
    decode_one(scheduler, runner, a)  # 7 tokens, 6 computed
    cache = scheduler.block_manager.prefix_cache
    assert len(cache) == 1
    # Drafts at positions 7..10, all wrong: the correction lands at position 7, which completes
    # block 1 (positions 4..7) but holds the first draft's KV until the next step rewrites it.
    a.spec_token_ids = [(t + 1) % VOCAB for t in truth[1:5]]
    spec_step(scheduler, runner)
    assert a.num_tokens == 8 and a.num_computed_tokens == 7
    assert len(cache) == 1, "a block holding a rejected draft's KV was cached"
    spec_step(scheduler, runner)  # position 7 recomputed from the correction
    assert len(cache) == 2
    spec_run_all(scheduler, runner, bad_proposer({"a": truth}))
    assert a.output_token_ids == truth[:12]
    # A request sharing a's verified tokens reads the cached KV: its tokens must be the true ones.
    shared = (prompt + truth)[:16] + [3, 1, 4]
    b = make_request("b", shared, max_tokens=6)
    scheduler.add_request(b)
    spec_run_all(scheduler, runner, bad_proposer({"b": reference_tokens(shared, 20)}))
    assert b.num_cached_tokens == 16
    assert b.output_token_ids == reference_tokens(shared, 6)


@pytest.mark.parametrize("proposer", ["bad", "mixed", "truth"])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_outputs_equal_the_direct_computation_under_pressure(make_spec_scheduler, proposer: str,
                                                           sliding_window: int | None) -> None:
    """Many requests with shared prefixes through a small pool (preemptions), chunked prefill
    and a sliding window: whatever the drafts, the tokens are the model's, no block leaks, and a
    table never holds more than its tokens plus one step's drafts need."""
    k = 4
    pool = dict(num_blocks=17 if sliding_window is None else 9, max_num_batched_tokens=12, max_num_seqs=4,
                max_model_len=48, sliding_window=sliding_window)
    scheduler, runner = make_spec_scheduler(**pool)
    stem = prompt_of(9, 10)
    prompts = {f"r{i}": (stem[: 3 + 2 * i] + prompt_of(i, 4 + i))[:20] for i in range(8)}
    truths = {rid: reference_tokens(p, 48, sliding_window) for rid, p in prompts.items()}
    propose = {"bad": bad_proposer(truths), "mixed": truth_proposer(truths, wrong_every=4, seed=1),
               "truth": truth_proposer(truths)}[proposer]
    for i, (rid, prompt) in enumerate(prompts.items()):
        scheduler.add_request(make_request(rid, prompt, max_tokens=10 + 2 * i))
    requests = {rid: scheduler.get_request(rid) for rid in prompts}
    bm = scheduler.block_manager

    def check(output: SchedulerOutput) -> None:
        for request in scheduler.running:
            table = bm.get_block_table(request.request_id)
            assert len(table) <= cdiv(request.num_tokens + k, bm.block_size)

    steps = spec_run_all(scheduler, runner, propose, k, on_step=check)
    for rid, request in requests.items():
        assert request.output_token_ids == truths[rid][: request.max_tokens]
    assert bm.num_free_blocks == bm.num_total_blocks
    assert scheduler.num_preemptions > 0
    stats = scheduler.stats().spec_decode
    assert stats.num_draft_tokens > 50
    if proposer == "bad":
        assert stats.num_accepted_tokens == 0 and stats.mean_accepted_length == 1.0
    if proposer == "truth":
        assert stats.acceptance_rate > 0.9
        plain, plain_runner = make_spec_scheduler(**pool)
        for i, (rid, prompt) in enumerate(prompts.items()):
            plain.add_request(make_request(rid, prompt, max_tokens=10 + 2 * i))
        assert steps < spec_run_all(plain, plain_runner, lambda _: [], k)


def test_acceptance_stats_per_request_and_overall(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler()
    prompt = prompt_of(6, 5)
    truth = reference_tokens(prompt, 30)
    request = make_request("a", prompt, max_tokens=30)
    decode_one(scheduler, runner, request)
    n = request.num_output_tokens
    request.spec_token_ids = [truth[n], truth[n + 1], (truth[n + 2] + 1) % VOCAB]  # 2 of 3 accepted
    spec_step(scheduler, runner)
    n = request.num_output_tokens
    request.spec_token_ids = [(truth[n] + 1) % VOCAB, truth[n + 1]]  # 0 of 2
    spec_step(scheduler, runner)
    spec_step(scheduler, runner)  # no drafts: not a verify step
    assert (request.num_draft_tokens, request.num_accepted_draft_tokens) == (5, 2)
    stats = scheduler.stats().spec_decode
    assert (stats.num_verify_steps, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 5, 2)
    assert stats.acceptance_rate == pytest.approx(2 / 5)
    assert stats.mean_accepted_length == pytest.approx(1 + 2 / 2)  # tokens per verify step
    stats.num_draft_tokens = 0  # a snapshot: the scheduler's own counts are untouched
    assert scheduler.stats().spec_decode.num_draft_tokens == 5


def test_a_runner_that_misreports_acceptance_is_caught(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler()
    request = make_request("a", prompt_of(7, 5), max_tokens=30)
    decode_one(scheduler, runner, request)
    request.spec_token_ids = [1, 2]
    output = scheduler.schedule()
    with pytest.raises(AssertionError, match="accepted 2 drafts"):
        scheduler.update(output, RunnerOutput({"a": [1, 5, 6]}, num_accepted_draft_tokens={"a": 2}))
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)


def test_abort_with_drafts_in_flight_frees_every_block(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler()
    request = make_request("a", prompt_of(8, 5), max_tokens=30)
    decode_one(scheduler, runner, request)
    request.spec_token_ids = [1, 2, 3]
    output = scheduler.schedule()
    runner_output = runner.execute(output)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(output, runner_output) == []
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


def test_a_decode_the_budget_skips_keeps_its_drafts(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(max_num_batched_tokens=8, max_num_seqs=2)
    short_prompt = prompt_of(2, 3)
    truth = reference_tokens(short_prompt, 20)
    short = make_request("short", short_prompt, max_tokens=12)
    decode_one(scheduler, runner, short)
    # A higher-priority long prompt goes first and its chunks take the whole budget.
    scheduler.add_request(make_request("long", prompt_of(1, 27), max_tokens=4, priority=-1))
    spec_step(scheduler, runner)
    n = short.num_output_tokens
    drafts = truth[n : n + 3]
    short.spec_token_ids = list(drafts)
    skipped = 0
    while True:
        output, _ = spec_step(scheduler, runner)
        scheduled = {s.request_id: s for s in output.scheduled}
        if "short" in scheduled:
            break
        skipped += 1
        assert short.spec_token_ids == drafts and short.num_computed_tokens == short.num_tokens - 1
    assert skipped == 2
    # long's last chunk (20 = 8 + 8 + 4 tokens after its first 7) leaves room for all three.
    assert scheduled["long"].num_new_tokens == 4
    assert scheduled["short"].draft_token_ids == drafts
    assert short.output_token_ids == truth[: n + 4]


def test_lookahead_slots_hold_the_verify_step(make_spec_scheduler) -> None:
    # A draft model writes KV for the last token and the first k - 1 drafts before the step is
    # scheduled: those slots come first, and the verify step then needs no block of its own.
    scheduler, runner = make_spec_scheduler(num_blocks=6, max_model_len=20)
    request = make_request("a", prompt_of(1, 6), max_tokens=12)
    decode_one(scheduler, runner, request)  # 7 tokens, 6 computed: 2 blocks of 4
    bm = scheduler.block_manager
    assert scheduler.allocate_lookahead(request, 4)  # positions 6..9
    assert len(bm.get_block_table("a")) == 3 and bm.num_free_blocks == 2
    scheduler.check_integrity()
    request.spec_token_ids = [1, 2, 3]  # verify positions 6..9: inside the lookahead slots
    output = scheduler.schedule()
    assert output.scheduled[0].draft_token_ids == [1, 2, 3] and bm.num_free_blocks == 2
    scheduler.update(output, runner.execute(output))
    scheduler.check_integrity()


def test_lookahead_takes_only_free_blocks(make_spec_scheduler) -> None:
    scheduler, runner = make_spec_scheduler(num_blocks=5, max_model_len=16)
    a, b = make_request("a", prompt_of(1, 7), max_tokens=8), make_request("b", prompt_of(2, 7), max_tokens=8)
    for request in (a, b):
        scheduler.add_request(request)
    spec_step(scheduler, runner)  # two prefills of 2 blocks each: the pool of 4 is full
    bm = scheduler.block_manager
    assert bm.num_free_blocks == 0
    assert scheduler.allocate_lookahead(a, 1)  # position 7: its second block has room
    assert not scheduler.allocate_lookahead(a, 2)  # position 8 needs a block nobody has free
    assert len(bm.get_block_table("a")) == 2 and scheduler.num_preemptions == 0
    scheduler.check_integrity()


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_lookahead_every_step_keeps_the_outputs_and_the_pool(make_spec_scheduler, sliding_window: int | None) -> None:
    """The engine's draft-model loop: lookahead slots for k tokens before drafting (none when
    the pool is short), then the verify step; preemptions drop them with the request's blocks."""
    k = 4
    scheduler, runner = make_spec_scheduler(num_blocks=13 if sliding_window is None else 9, max_num_batched_tokens=12,
                                            max_num_seqs=4, max_model_len=40, sliding_window=sliding_window)
    prompts = {f"r{i}": prompt_of(i, 5 + 3 * i) for i in range(6)}
    truths = {rid: reference_tokens(p, 40, sliding_window) for rid, p in prompts.items()}
    for i, (rid, prompt) in enumerate(prompts.items()):
        scheduler.add_request(make_request(rid, prompt, max_tokens=14 + i))
    requests = {rid: scheduler.get_request(rid) for rid in prompts}
    propose = truth_proposer(truths, wrong_every=3, seed=2)
    refused = 0
    while scheduler.has_unfinished_requests():
        for request in scheduler.running:
            if request.num_computed_tokens != request.num_tokens - 1:
                continue
            num_drafts = min(k, scheduler.max_num_draft_tokens(request))
            if num_drafts and scheduler.allocate_lookahead(request, num_drafts):
                request.spec_token_ids = propose(request)[:num_drafts]
            else:
                refused += 1
        spec_step(scheduler, runner)
    for rid, request in requests.items():
        assert request.output_token_ids == truths[rid][: request.max_tokens]
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert scheduler.num_preemptions > 0 and refused > 0
    assert scheduler.stats().spec_decode.num_accepted_tokens > 0
