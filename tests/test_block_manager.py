"""The KV block manager on its own: block tables, ref counts, all-or-nothing allocation, the
null block and sliding-window release. Every manager's integrity is checked after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from scheduler.block_manager import NULL_BLOCK_ID, BlockManager
from scheduler.request import Request


@pytest.fixture
def make_bm() -> Iterable[Callable[..., BlockManager]]:
    made: list[BlockManager] = []

    def make(num_blocks: int = 9, block_size: int = 4, **kwargs: object) -> BlockManager:
        made.append(BlockManager(num_blocks, block_size, **kwargs))
        return made[-1]

    yield make
    for bm in made:
        bm.check_integrity()


def request(request_id: str, num_prompt_tokens: int, first_token: int = 0) -> Request:
    return Request(request_id, list(range(first_token, first_token + num_prompt_tokens)), max_tokens=100)


def compute(bm: BlockManager, req: Request, num_new_tokens: int) -> bool:
    """What the scheduler does for one step of ``req``: allocate, then count the tokens computed."""
    if not bm.allocate_slots(req, num_new_tokens):
        return False
    req.num_computed_tokens += num_new_tokens
    bm.check_integrity()
    return True


def test_allocation_grows_one_table_in_place(make_bm) -> None:
    bm = make_bm()
    req = request("a", 10)
    assert compute(bm, req, 10)
    table = bm.get_block_table("a")
    assert len(table) == 3 and NULL_BLOCK_ID not in table and len(set(table)) == 3
    assert bm.num_free_blocks == 8 - 3 and bm.usage == pytest.approx(3 / 8)
    req.output_token_ids.append(99)
    assert compute(bm, req, 1)  # position 10 still fits the third block
    assert len(table) == 3
    req.output_token_ids += [98, 97]
    assert compute(bm, req, 2)  # position 12 opens a fourth
    assert bm.get_block_table("a") is table and len(table) == 4
    assert bm.num_free_blocks == 4


def test_free_returns_every_block_and_empties_the_table_in_place(make_bm) -> None:
    bm = make_bm()
    req = request("a", 13)
    assert compute(bm, req, 13)
    table = bm.get_block_table("a")
    bm.free(req)
    assert table == [] and bm.num_free_blocks == bm.num_total_blocks == 8
    assert "a" not in bm.holders()
    with pytest.raises(KeyError):
        bm.get_block_table("a")
    bm.free(req)  # freeing a request without blocks is a no-op
    assert bm.num_free_blocks == 8


def test_allocation_is_all_or_nothing(make_bm) -> None:
    bm = make_bm(num_blocks=5)  # 4 usable
    a, b = request("a", 12), request("b", 5, first_token=50)
    assert compute(bm, a, 12)
    assert not bm.can_allocate(b, 5)
    assert not bm.allocate_slots(b, 5)  # needs 2, 1 is free
    assert "b" not in bm.holders() and bm.num_free_blocks == 1
    assert bm.can_allocate(b, 4) and compute(bm, b, 4)
    a.output_token_ids.append(1)
    table_a = list(bm.get_block_table("a"))
    assert not bm.allocate_slots(a, 1)  # a running request that cannot grow keeps its table
    assert bm.get_block_table("a") == table_a and bm.num_free_blocks == 0
    bm.free(b)
    assert compute(bm, a, 1)


def test_null_block_is_never_handed_out(make_bm) -> None:
    bm = make_bm(num_blocks=6, enable_prefix_caching=False)
    requests = [request(f"r{i}", 4, first_token=10 * i) for i in range(5)]
    for req in requests:
        assert compute(bm, req, 4)
    assert sorted(b for r in requests for b in bm.get_block_table(r.request_id)) == [1, 2, 3, 4, 5]
    assert not bm.allocate_slots(request("x", 1), 1)


def test_ref_counts_equal_block_table_references(make_bm) -> None:
    bm = make_bm()
    a, b = request("a", 9), request("b", 9)
    assert compute(bm, a, 9)
    bm.cache_full_blocks(a)
    shared = bm.get_block_table("a")[:2]
    blocks, num_hit = bm.get_computed_blocks(b)
    assert (blocks, num_hit) == (shared, 8)
    assert bm.allocate_slots(b, 1, blocks)
    b.num_computed_tokens = 9
    assert bm.get_block_table("b")[:2] == shared
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    bm.free(a)
    assert [bm.ref_count(x) for x in shared] == [1, 1]
    assert not set(shared) & set(bm.free_block_ids())
    bm.free(b)
    assert [bm.ref_count(x) for x in shared] == [0, 0]
    assert set(shared) <= set(bm.free_block_ids())


def test_check_integrity_catches_broken_bookkeeping(make_bm) -> None:
    bm = make_bm()
    req = request("a", 5)
    assert compute(bm, req, 5)
    table = bm.get_block_table("a")
    bm._blocks[table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity()
    bm._blocks[table[0]].ref_count -= 1
    table.append(table[0])
    with pytest.raises(AssertionError, match="twice"):
        bm.check_integrity()
    table.pop()
    bm._free[table[1]] = None
    with pytest.raises(AssertionError, match="both free and used"):
        bm.check_integrity()
    del bm._free[table[1]]


def released_entries(table: list[int]) -> list[int]:
    return [i for i, block_id in enumerate(table) if block_id == NULL_BLOCK_ID]


def test_sliding_window_releases_blocks_wholly_outside_the_window(make_bm) -> None:
    window, bs = 6, 4
    bm = make_bm(num_blocks=20, sliding_window=window, enable_prefix_caching=False)
    req = request("a", 5)
    assert compute(bm, req, 5)
    for n in range(40):
        req.output_token_ids.append(n)
        nc = req.num_computed_tokens
        assert compute(bm, req, 1)
        table = bm.get_block_table("a")
        # Released exactly the blocks whose last position lies before nc - window.
        assert released_entries(table) == [i for i in range(len(table)) if (i + 1) * bs - 1 < nc - window]
        assert bm.num_free_blocks == bm.num_total_blocks - (len(table) - len(released_entries(table)))
    bm.free(req)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_sliding_window_growth_counts_blocks_it_releases(make_bm) -> None:
    bm = make_bm(num_blocks=4, sliding_window=4, enable_prefix_caching=False)  # 3 usable
    req = request("a", 12)
    assert compute(bm, req, 12)
    assert bm.num_free_blocks == 0
    for n in range(30):  # the window gives a block back whenever a new one is needed
        req.output_token_ids.append(n)
        assert bm.can_allocate(req, 1)
        assert compute(bm, req, 1)
    assert len(bm.get_block_table("a")) == 11


def test_sliding_window_prefix_hit_does_not_revive_blocks_outside_the_window(make_bm) -> None:
    bm = make_bm(num_blocks=12, sliding_window=6)
    a, b = request("a", 17), request("b", 17)
    assert compute(bm, a, 17)
    bm.cache_full_blocks(a)
    cached = list(bm.get_block_table("a"))[:4]
    bm.free(a)
    blocks, num_hit = bm.get_computed_blocks(b)
    assert (blocks, num_hit) == (cached, 16)
    free_before = bm.num_free_blocks
    assert bm.allocate_slots(b, 1, blocks)
    b.num_computed_tokens = 17
    table = bm.get_block_table("b")
    # Blocks 0 and 1 end before 16 - 6: never read again, so they stay free (and cached).
    assert table[:4] == [NULL_BLOCK_ID, NULL_BLOCK_ID, cached[2], cached[3]]
    assert bm.ref_count(cached[0]) == bm.ref_count(cached[1]) == 0
    assert bm.num_free_blocks == free_before - 3  # two revived, one fresh
