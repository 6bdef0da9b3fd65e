"""Prefix caching: hits, misses, salts, sharing, LRU eviction order, reset, and hash collisions.

Requests run through the scheduler with the fake runner of ``test_scheduler``, whose tokens
depend on the KV read back through the block table: a hit that served the wrong KV would change
the output, which is compared with a direct computation over the true sequence.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.block_manager import BlockManager
from scheduler.prefix_cache import (
    BlockHash,
    available_hash_algos,
    block_preimage,
    sha256_block_hash,
)
from scheduler.request import Request
from scheduler.scheduler import Scheduler
from tests.test_scheduler import FakeRunner, make_config, prompt_of, reference_tokens, run_all, step


@pytest.fixture
def cached() -> tuple[Scheduler, FakeRunner]:
    config = make_config(block_size=4, num_blocks=65)
    scheduler = Scheduler(config)
    yield scheduler, FakeRunner(config)
    scheduler.check_integrity()


def serve(scheduler: Scheduler, runner: FakeRunner, request_id: str, prompt: list[int], max_tokens: int = 4,
          **kwargs: object) -> Request:
    """Run one request to the end; check its output against the direct computation."""
    request = Request(request_id, list(prompt), max_tokens=max_tokens, **kwargs)
    scheduler.add_request(request)
    run_all(scheduler, runner)
    assert request.output_token_ids == reference_tokens(prompt, max_tokens)
    return request


def test_prefix_hit_skips_cached_blocks(cached) -> None:
    scheduler, runner = cached
    base = prompt_of(1, 18)
    serve(scheduler, runner, "a", base)
    # Shares tokens 0..13: blocks 0-2 are whole hits; block 3 differs at position 14.
    follow = base[:14] + [49, 48, 47, 46]
    request = Request("b", follow, max_tokens=4)
    scheduler.add_request(request)
    output, _ = step(scheduler, runner)
    (s,) = output.scheduled
    assert (s.start_position, s.token_ids) == (12, follow[12:])
    assert request.num_cached_tokens == 12
    run_all(scheduler, runner)
    assert request.output_token_ids == reference_tokens(follow, 4)
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (18 + 18, 12)


@pytest.mark.parametrize(("position", "num_hit"), [(0, 0), (3, 0), (4, 4), (7, 4), (11, 8), (12, 12)])
def test_one_differing_token_misses_from_its_block_on(cached, position: int, num_hit: int) -> None:
    scheduler, runner = cached
    base = prompt_of(2, 17)
    serve(scheduler, runner, "a", base)
    other = list(base)
    other[position] = (other[position] + 1) % 50
    assert serve(scheduler, runner, "b", other).num_cached_tokens == num_hit


def test_different_salts_never_share(cached) -> None:
    scheduler, runner = cached
    prompt = prompt_of(3, 13)
    serve(scheduler, runner, "a", prompt, cache_salt="tenant-1")
    assert serve(scheduler, runner, "b", prompt, cache_salt="tenant-2").num_cached_tokens == 0
    assert serve(scheduler, runner, "c", prompt).num_cached_tokens == 0
    assert serve(scheduler, runner, "d", prompt, cache_salt="tenant-1").num_cached_tokens == 12
    assert serve(scheduler, runner, "e", prompt, cache_salt="tenant-2").num_cached_tokens == 12


def test_n_choices_share_prompt_blocks(cached) -> None:
    scheduler, runner = cached
    prompt = prompt_of(4, 13)
    first = Request("n0", prompt, max_tokens=6)
    scheduler.add_request(first)
    step(scheduler, runner)
    second = Request("n1", list(prompt), max_tokens=6)
    scheduler.add_request(second)
    step(scheduler, runner)
    bm = scheduler.block_manager
    shared = bm.get_block_table("n0")[:3]
    assert bm.get_block_table("n1")[:3] == shared and second.num_cached_tokens == 12
    assert [bm.ref_count(b) for b in shared] == [2, 2, 2]
    assert bm.get_block_table("n0")[3] != bm.get_block_table("n1")[3]  # partial blocks never shared
    run_all(scheduler, runner)
    assert first.output_token_ids == second.output_token_ids == reference_tokens(prompt, 6)
    assert [bm.ref_count(b) for b in shared] == [0, 0, 0]


def lookup(bm: BlockManager, prompt: list[int], request_id: str = "probe") -> int:
    return bm.get_computed_blocks(Request(request_id, list(prompt), max_tokens=1))[1]


def computed(bm: BlockManager, request_id: str, prompt: list[int]) -> Request:
    req = Request(request_id, list(prompt), max_tokens=1)
    blocks, num_hit = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, len(prompt) - num_hit, blocks)
    req.num_computed_tokens = len(prompt)
    bm.cache_full_blocks(req)
    bm.check_integrity()
    return req


def test_freed_blocks_are_reused_least_recently_freed_first_tail_before_head() -> None:
    bm = BlockManager(num_blocks=9, block_size=4)
    a = computed(bm, "a", prompt_of(5, 9))  # blocks 1, 2 full and cached; 3 partial
    b = computed(bm, "b", prompt_of(6, 8))  # blocks 4, 5
    assert bm.get_block_table("a") == [1, 2, 3] and bm.get_block_table("b") == [4, 5]
    bm.free(a)
    bm.free(b)
    # Nothing-cached blocks first, then a's blocks tail first, then b's.
    assert bm.free_block_ids() == [3, 6, 7, 8, 2, 1, 5, 4]
    computed(bm, "c", prompt_of(7, 20))  # five fresh blocks: evicts a's second block
    assert bm.get_block_table("c") == [3, 6, 7, 8, 2]
    assert lookup(bm, prompt_of(5, 9)) == 4  # a's head survives
    assert lookup(bm, prompt_of(6, 9)) == 8  # b's blocks are untouched
    bm.check_integrity()


def test_revived_block_keeps_its_hash_and_tokens() -> None:
    bm = BlockManager(num_blocks=9, block_size=4)
    prompt = prompt_of(8, 9)
    a = computed(bm, "a", prompt)
    head = bm.get_block_table("a")[0]
    before = bm.prefix_cache.entry(head)
    bm.free(a)
    assert head in bm.free_block_ids() and bm.prefix_cache.entry(head) == before
    b = computed(bm, "b", prompt)
    assert bm.get_block_table("b")[0] == head and head not in bm.free_block_ids()
    entry = bm.prefix_cache.entry(head)
    assert (entry.block_hash, entry.token_ids) == (before.block_hash, tuple(prompt[:4]))
    bm.free(b)
    assert lookup(bm, prompt) == 8
    bm.check_integrity()


def test_eviction_never_takes_a_block_in_use() -> None:
    bm = BlockManager(num_blocks=7, block_size=4)  # 6 usable
    prompt = prompt_of(9, 9)
    a = computed(bm, "a", prompt)  # 3 blocks, 2 cached, all in use
    in_use = list(bm.get_block_table("a"))
    computed(bm, "b", prompt_of(10, 12))  # the other 3
    assert not bm.allocate_slots(Request("c", [1], max_tokens=1), 1)
    assert lookup(bm, prompt) == 8 and bm.get_block_table("a") == in_use
    assert [bm.ref_count(x) for x in in_use] == [1, 1, 1]
    bm.free(a)
    bm.check_integrity()


@pytest.mark.parametrize(("prompt_len", "num_hit"), [(11, 8), (12, 8), (13, 12), (16, 12), (17, 16)])
def test_hit_leaves_at_least_one_token_to_compute(cached, prompt_len: int, num_hit: int) -> None:
    scheduler, runner = cached
    long_prompt = prompt_of(11, 17)
    serve(scheduler, runner, "a", long_prompt)  # caches blocks 0-3 (positions 0..15)
    request = serve(scheduler, runner, "b", long_prompt[:prompt_len])
    assert request.num_cached_tokens == num_hit


def test_output_tokens_fill_cached_blocks(cached) -> None:
    scheduler, runner = cached
    prompt = prompt_of(12, 6)
    first = serve(scheduler, runner, "a", prompt, max_tokens=10)  # 16 tokens, 15 computed
    follow_up = prompt + first.output_token_ids + [1, 2]
    assert serve(scheduler, runner, "b", follow_up).num_cached_tokens == 12


def test_reset_prefix_cache_while_requests_run(cached) -> None:
    scheduler, runner = cached
    prompt = prompt_of(13, 13)
    running = Request("a", prompt, max_tokens=12)
    scheduler.add_request(running)
    step(scheduler, runner)
    assert len(scheduler.block_manager.prefix_cache) == 3
    assert scheduler.reset_prefix_cache()
    assert len(scheduler.block_manager.prefix_cache) == 0
    scheduler.check_integrity()
    assert serve(scheduler, runner, "b", prompt, max_tokens=1).num_cached_tokens == 0  # beside "a"
    run_all(scheduler, runner)
    assert running.output_token_ids == reference_tokens(prompt, 12)
    # "a" cached nothing more after the reset; "b" cached its own prompt blocks again.
    assert serve(scheduler, runner, "c", prompt + running.output_token_ids).num_cached_tokens == 12


def test_forced_hash_collision_never_serves_wrong_tokens(cached) -> None:
    scheduler, runner = cached
    scheduler.block_manager.prefix_cache.hash_fn = lambda *_: BlockHash(b"same")
    fives = [5] * 12 + [9]
    serve(scheduler, runner, "a", fives)
    serve(scheduler, runner, "salted", fives, cache_salt="x")
    # Every block hashes alike and has the same tokens: only the chain tells them apart.
    assert serve(scheduler, runner, "b", fives).num_cached_tokens == 12
    assert serve(scheduler, runner, "c", [5] * 8 + [9]).num_cached_tokens == 8
    assert serve(scheduler, runner, "d", [5] * 4 + [6] * 4 + [5] * 4 + [9]).num_cached_tokens == 4
    assert serve(scheduler, runner, "e", [6] * 4 + [5] * 8 + [9]).num_cached_tokens == 0
    assert serve(scheduler, runner, "f", fives, cache_salt="y").num_cached_tokens == 0
    assert serve(scheduler, runner, "g", fives, cache_salt="x").num_cached_tokens == 12


def test_prefix_caching_can_be_turned_off() -> None:
    config = make_config(enable_prefix_caching=False)
    scheduler, runner = Scheduler(config), FakeRunner(config)
    prompt = prompt_of(14, 13)
    serve(scheduler, runner, "a", prompt)
    assert serve(scheduler, runner, "b", prompt).num_cached_tokens == 0
    assert scheduler.block_manager.prefix_cache is None
    assert scheduler.stats().prefix_cache_queries == 0
    scheduler.check_integrity()


@pytest.mark.parametrize("algo", sorted(available_hash_algos()))
def test_every_hash_algo_serves_hits(algo: str) -> None:
    config = make_config(prefix_caching_hash_algo=algo)
    scheduler, runner = Scheduler(config), FakeRunner(config)
    prompt = prompt_of(15, 9)
    serve(scheduler, runner, "a", prompt)
    assert serve(scheduler, runner, "b", prompt).num_cached_tokens == 8
    scheduler.check_integrity()


def test_unknown_hash_algo_is_rejected() -> None:
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        make_config(prefix_caching_hash_algo="builtin")


def test_block_hash_is_chained_salted_and_stable_across_processes() -> None:
    first = sha256_block_hash(None, [1, 2, 3, 4], "salt")
    second = sha256_block_hash(first, [5, 6, 7, 8], None)
    assert first != sha256_block_hash(None, [1, 2, 3, 4], None)
    assert second != sha256_block_hash(sha256_block_hash(None, [1, 2, 3, 5], "salt"), [5, 6, 7, 8], None)
    assert block_preimage(None, [1, 2], None) != block_preimage(None, [1, 2, 0], None)
    code = (
        "from scheduler.prefix_cache import sha256_block_hash as h\n"
        "print(h(h(None, [1, 2, 3, 4], 'salt'), [5, 6, 7, 8], None).hex())"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == second.hex()
