"""Property-based: random arrivals, steps, aborts, stop-string finishes and prefix-cache resets
against a small KV pool (so preemption happens), with and without prefix caching, sliding
windows and a hash that always collides.

After every operation the scheduler's and block manager's integrity holds (ref counts, free
list, every cached block's tokens hash to its key and match its request's tokens); every
output equals the direct computation over the true sequence (so no request ever read a wrong
block); and once every request is aborted, every block is free.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config import SchedulerConfig
from scheduler.prefix_cache import BlockHash
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import QueueFullError, Scheduler
from tests.test_scheduler import VOCAB, FakeRunner, reference_tokens

# Prompts share prefixes: a few stems, cut at random lengths, with a random tail. The last stem
# repeats one block's tokens, so only the chain of parents tells its blocks apart.
STEMS = [[(7 * s + 3 * i) % VOCAB for i in range(24)] for s in range(2)] + [[4, 5] * 12]


@st.composite
def configs(draw: st.DrawFn) -> SchedulerConfig:
    block_size = draw(st.sampled_from([2, 4]))
    num_blocks = draw(st.integers(4, 12))
    max_num_seqs = draw(st.integers(1, 4))
    sliding_window = draw(st.one_of(st.none(), st.integers(2, 9)))
    return SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 12)),
        max_model_len=min(24, (num_blocks - 1) * block_size),
        block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=draw(st.sampled_from([True, True, False])),
        sliding_window=sliding_window,
        max_waiting_requests=draw(st.sampled_from([None, 3])),
    )


# Operations are (kind, seed) pairs, the seed choosing the details: two draws an operation keep
# generation fast.
KINDS = ["add", "add", "add", "step", "step", "abort", "stop", "reset"]
ops = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2**16)), min_size=10, max_size=40)


def new_request(request_id: str, seed: int, max_model_len: int, eos: int | None) -> Request:
    rng = random.Random(seed)
    stem = STEMS[rng.randrange(len(STEMS))][: rng.randint(1, 20)]
    tail = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))]
    return Request(request_id, (stem + tail)[:max_model_len], max_tokens=rng.randint(1, 16),
                   priority=rng.randint(0, 2), cache_salt=rng.choice([None, None, "t1"]), eos_token_id=eos)


@settings(max_examples=100, deadline=None)
@given(config=configs(), operations=ops, collide=st.booleans(), drain=st.integers(0, 3).map(bool),
       eos=st.one_of(st.none(), st.integers(0, VOCAB - 1)))
def test_random_operations_keep_the_kv_bookkeeping_exact(config: SchedulerConfig,
                                                         operations: list[tuple[str, int]],
                                                         collide: bool, drain: bool, eos: int | None) -> None:
    scheduler, runner = Scheduler(config), FakeRunner(config)
    if collide and scheduler.block_manager.prefix_cache is not None:
        scheduler.block_manager.prefix_cache.hash_fn = lambda *_: BlockHash(b"same")
    requests: list[Request] = []

    def check_outputs() -> None:
        for r in requests:
            assert r.output_token_ids == reference_tokens(r.prompt_token_ids, r.num_output_tokens,
                                                          config.sliding_window)

    def step() -> None:
        output = scheduler.schedule()
        assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
        scheduler.update(output, runner.execute(output))

    for kind, seed in operations:
        if kind == "add":
            request = new_request(f"r{len(requests)}", seed, config.max_model_len, eos)
            try:
                scheduler.add_request(request)
            except QueueFullError:  # preempted requests count too, so the queue may be over its bound
                assert scheduler.num_waiting >= config.max_waiting_requests
                continue
            requests.append(request)
        elif kind == "step":
            for _ in range(1 + seed % 8):
                step()
                scheduler.check_integrity()
        elif kind == "reset":
            assert scheduler.reset_prefix_cache()
        elif requests:
            status = RequestStatus.FINISHED_ABORTED if kind == "abort" else RequestStatus.FINISHED_STOPPED
            scheduler.finish_requests(requests[seed % len(requests)].request_id, status)
        scheduler.check_integrity()
    check_outputs()

    # Often run everything to the end first; either way, aborting the rest frees every block.
    if drain:
        for _ in range(300):
            if not scheduler.has_unfinished_requests():
                break
            step()
            scheduler.check_integrity()
        assert not scheduler.has_unfinished_requests(), "requests starved"
        check_outputs()
    scheduler.finish_requests([r.request_id for r in requests], RequestStatus.FINISHED_ABORTED)
    scheduler.check_integrity()
    assert not scheduler.has_unfinished_requests()
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert all(r.is_finished for r in requests)
