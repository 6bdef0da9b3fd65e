"""KV block manager: a fixed pool of reference-counted KV blocks, one block table per request,
and the prefix cache over them.

::

    one request's block table (block_size 4, sliding window 6, 13 tokens computed, 3 new):

    positions   0-3     4-7     8-11    12-15
    table     [ NULL |   7   |   3   |   9   ]
                 ^ released: last position 3 < 13 - 6, no later token attends to it
                                         12|13 14 15  <- computed | new this step

Block 0 is the null block: never handed out, it fills the table entries the window released,
so every entry stays a valid block id (the runner may also point padding slots at it). Of
``num_blocks``, ``num_blocks - 1`` are usable.

Free blocks sit in one LRU list (front = reused first). A freed block keeps its prefix-cache
entry until it is reused, so a later request can still hit it; reusing it drops the entry.
Freed blocks with nothing cached go to the front.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.config import SchedulerConfig, cdiv
from scheduler.prefix_cache import CacheEntry, PrefixCache
from scheduler.request import Request

NULL_BLOCK_ID = 0


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0


@dataclass(slots=True)
class _CacheCursor:
    """How far a request's block table has been offered to the prefix cache."""

    num_blocks: int = 0
    parent: CacheEntry | None = None
    broken: bool = False  # the chain lost its parent (cache reset): cache nothing more


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_algo: str = "sha256", sliding_window: int | None = None) -> None:
        assert num_blocks >= 2, "block 0 is the null block; at least one more is needed"
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sliding_window = sliding_window
        self.prefix_cache = PrefixCache(block_size, hash_algo) if enable_prefix_caching else None
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._cursors: dict[str, _CacheCursor] = {}

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> BlockManager:
        return cls(config.num_blocks, config.block_size, config.enable_prefix_caching,
                   config.prefix_caching_hash_algo, config.sliding_window)

    @property
    def num_total_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def free_block_ids(self) -> list[int]:
        """Free blocks in reuse order (the first is handed out next)."""
        return list(self._free)

    def get_block_table(self, request_id: str) -> list[int]:
        """The request's live block table: the same list every call, grown in place."""
        return self._tables[request_id]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks holding the longest prefix of a not-yet-computed request, and how many
        tokens they cover. A pure lookup: pass the blocks to ``allocate_slots`` to take them.

        At most ``num_tokens - 1`` tokens hit, so one is left to compute and sample from.
        """
        if self.prefix_cache is None or request.num_computed_tokens:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = self.prefix_cache.match(request.all_token_ids, request.cache_salt, max_blocks)
        return hits, len(hits) * self.block_size

    def can_allocate(self, request: Request, num_new_tokens: int,
                     computed_blocks: Sequence[int] = ()) -> bool:
        return self._num_blocks_to_take(request, num_new_tokens, computed_blocks) <= self.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> bool:
        """Grow the request's block table to hold its computed tokens, then ``computed_blocks``
        (prefix hits, appended as computed), then ``num_new_tokens``. All or nothing: returns
        False and changes nothing when the free blocks do not suffice."""
        table = self._tables.get(request.request_id)
        if (table is not None and not computed_blocks and self.sliding_window is None
                and len(table) * self.block_size >= request.num_computed_tokens + num_new_tokens):
            return True  # the common decode step: the last block still has room
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return False
        table = self._tables.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        first_kept = self._num_outside_window(num_computed)
        self._release(table, first_kept)
        for block_id in computed_blocks:
            if len(table) < first_kept:
                table.append(NULL_BLOCK_ID)
            else:
                self._ref(block_id)
                table.append(block_id)
        if computed_blocks:
            assert self.prefix_cache is not None
            self._cursors[request.request_id] = _CacheCursor(
                len(table), self.prefix_cache.entry(computed_blocks[-1]))
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size)
        while len(table) < num_needed:
            table.append(self._take_free_block())
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references; its table is emptied in place (the runner may hold it)."""
        self._cursors.pop(request.request_id, None)
        table = self._tables.pop(request.request_id, None)
        if table is None:
            return
        # Tail first, so the tail of a sequence is evicted before its head.
        for block_id in reversed(table):
            if block_id != NULL_BLOCK_ID:
                self._unref(block_id)
        table.clear()

    def cache_full_blocks(self, request: Request) -> None:
        """Enter into the prefix cache the request's blocks now full of computed tokens."""
        table = self._tables.get(request.request_id)
        if self.prefix_cache is None or table is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        cursor = self._cursors.get(request.request_id)
        if cursor is None:
            cursor = self._cursors[request.request_id] = _CacheCursor()
        if cursor.broken or cursor.num_blocks >= num_full:
            return  # most steps fill no block
        bs = self.block_size
        while not cursor.broken and cursor.num_blocks < num_full:
            i = cursor.num_blocks
            block_id = table[i]
            if block_id == NULL_BLOCK_ID:
                # The window let it go before its tokens were known (a step scheduled ahead of
                # update): the chain of cached blocks ends here.
                cursor.broken = True
                break
            entry = self.prefix_cache.entry(block_id)
            if entry is None:
                tokens = [request.token_id_at(p) for p in range(i * bs, (i + 1) * bs)]
                entry = self.prefix_cache.insert(block_id, cursor.parent, tokens, request.cache_salt)
            cursor.parent = entry
            cursor.num_blocks = i + 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, free or in use. In-use blocks keep serving their requests;
        those requests cache nothing more, since their chains now start from forgotten blocks."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        for cursor in self._cursors.values():
            cursor.broken = True
        return True

    def holders(self) -> set[str]:
        """Ids of the requests holding a block table."""
        return set(self._tables)

    def check_integrity(self) -> None:
        refs: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            live = [b for b in table if b != NULL_BLOCK_ID]
            assert len(set(live)) == len(live), f"{request_id}: a block appears twice in its table"
            for block_id in live:
                assert 0 < block_id < self.num_blocks, f"{request_id}: bad block id {block_id}"
                refs[block_id] += 1
        null = self._blocks[NULL_BLOCK_ID]
        assert null.ref_count == 0 and NULL_BLOCK_ID not in self._free, "the null block was handed out"
        assert len(set(self._free)) == len(self._free), "duplicate in the free list"
        for block in self._blocks[1:]:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref count {block.ref_count} != {refs[block.block_id]} table refs")
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id} is {'both free and used' if block.ref_count else 'lost'}")
        assert set(self._cursors) <= set(self._tables), "cache cursor of a request without blocks"
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()

    def check_request(self, request: Request) -> None:
        """The request's table covers its computed tokens and its cached blocks hold its tokens."""
        table = self._tables.get(request.request_id, [])
        assert len(table) * self.block_size >= request.num_computed_tokens, (
            f"{request.request_id}: {len(table)} blocks cannot hold {request.num_computed_tokens} tokens")
        if self.prefix_cache is None:
            return
        bs = self.block_size
        for i, block_id in enumerate(table):
            entry = self.prefix_cache.entry(block_id) if block_id != NULL_BLOCK_ID else None
            if entry is not None:
                tokens = tuple(request.token_id_at(p) for p in range(i * bs, (i + 1) * bs))
                assert entry.token_ids == tokens, f"{request.request_id}: block {block_id} has wrong tokens"

    def _num_outside_window(self, num_computed_tokens: int) -> int:
        """Leading blocks no token from ``num_computed_tokens`` on attends to (last position
        ``< num_computed_tokens - sliding_window``)."""
        if self.sliding_window is None:
            return 0
        return max(0, (num_computed_tokens - self.sliding_window) // self.block_size)

    def _num_blocks_to_take(self, request: Request, num_new_tokens: int,
                            computed_blocks: Sequence[int]) -> int:
        """Free blocks ``allocate_slots`` would consume, net of those the window gives back."""
        table = self._tables.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        first_kept = self._num_outside_window(num_computed)
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size)
        num_fresh = max(0, num_needed - len(table) - len(computed_blocks))
        num_revived = sum(
            1 for i, block_id in enumerate(computed_blocks, start=len(table))
            if i >= first_kept and self._blocks[block_id].ref_count == 0
        )
        num_released = sum(
            1 for block_id in table[:first_kept]
            if block_id != NULL_BLOCK_ID and self._blocks[block_id].ref_count == 1
        )
        return num_fresh + num_revived - num_released

    def _release(self, table: list[int], first_kept: int) -> None:
        for i in reversed(range(min(first_kept, len(table)))):
            if table[i] != NULL_BLOCK_ID:
                self._unref(table[i])
                table[i] = NULL_BLOCK_ID

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        if self.prefix_cache is not None:
            self.prefix_cache.remove(block_id)
        self._blocks[block_id].ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]  # a prefix hit revives a free cached block
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed twice"
        block.ref_count -= 1
        if block.ref_count:
            return
        self._free[block_id] = None
        if self.prefix_cache is None or block_id not in self.prefix_cache:
            # Nothing cached in it: reusing it first loses nothing.
            self._free.move_to_end(block_id, last=False)
