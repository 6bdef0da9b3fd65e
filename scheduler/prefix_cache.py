"""Prefix cache: full KV blocks keyed by a hash chained over the tokens before and in them.

::

    block:        0                 1                 2
    tokens:   [t0 .. t15]      [t16 .. t31]      [t32 .. t47]
    hash:     h0 = H(-, t0..15, salt)  h1 = H(h0, t16..31)  h2 = H(h1, t32..47)

A block's hash names its whole prefix, so equal hashes mean equal prefixes, up to collisions.
The hash only finds candidates: a hit also compares the block's token ids and checks that the
candidate was cached after the very prefix just matched (its parent's ``prefix_id``), so even a
colliding hash never serves another prefix's KV.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
HashFn = Callable[[BlockHash | None, Sequence[int], str | None], BlockHash]


def block_preimage(parent_hash: BlockHash | None, token_ids: Sequence[int], salt: str | None) -> bytes:
    """A stable, unambiguous serialisation (same bytes in every process and on every machine)."""
    parent = parent_hash or b""
    salt_bytes = salt.encode() if salt else b""
    header = struct.pack("<III", len(parent), len(salt_bytes), len(token_ids))
    return header + parent + salt_bytes + struct.pack(f"<{len(token_ids)}q", *token_ids)


def sha256_block_hash(parent_hash: BlockHash | None, token_ids: Sequence[int], salt: str | None) -> BlockHash:
    return BlockHash(hashlib.sha256(block_preimage(parent_hash, token_ids, salt)).digest())


def xxhash_block_hash(parent_hash: BlockHash | None, token_ids: Sequence[int], salt: str | None) -> BlockHash:
    import xxhash

    return BlockHash(xxhash.xxh3_128_digest(block_preimage(parent_hash, token_ids, salt)))


def available_hash_algos() -> dict[str, HashFn]:
    algos: dict[str, HashFn] = {"sha256": sha256_block_hash}
    try:
        import xxhash  # noqa: F401
    except ImportError:
        pass
    else:
        algos["xxhash"] = xxhash_block_hash
    return algos


@dataclass(slots=True)
class CacheEntry:
    """What the cache knows about one cached block."""

    block_id: int
    block_hash: BlockHash
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]
    salt: str | None  # only on a first block; later blocks inherit it through the chain
    # Equal for entries holding the same verified prefix; never reused for another prefix.
    prefix_id: int
    parent_prefix_id: int | None


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix lookups, in tokens: hit rate = hits / queries."""

    queries: int = 0
    hits: int = 0

    def record(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_queried_tokens
        self.hits += num_hit_tokens


class PrefixCache:
    """Index of cached full blocks. It never owns blocks: the block manager decides when a block
    enters (``insert``, once full of computed tokens) and leaves (``remove``, when it is reused).

    Several blocks may hold the same prefix (requests that computed it at the same time); they
    share one ``prefix_id``, so a chain can continue through any of them.
    """

    def __init__(self, block_size: int, hash_algo: str = "sha256") -> None:
        self.block_size = block_size
        self.hash_fn: HashFn = available_hash_algos()[hash_algo]
        self._entries: dict[int, CacheEntry] = {}
        self._by_hash: dict[BlockHash, dict[int, CacheEntry]] = {}
        self._prefix_ids = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._entries

    def entry(self, block_id: int) -> CacheEntry | None:
        return self._entries.get(block_id)

    def match(self, token_ids: Sequence[int], salt: str | None, max_blocks: int) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids``, at most ``max_blocks``."""
        bs = self.block_size
        hits: list[int] = []
        parent: CacheEntry | None = None
        for i in range(max_blocks):
            block_tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            entry = self._find(parent, block_tokens, salt)
            if entry is None:
                break
            hits.append(entry.block_id)
            parent = entry
        return hits

    def insert(self, block_id: int, parent: CacheEntry | None, token_ids: Sequence[int],
               salt: str | None) -> CacheEntry:
        """Cache ``block_id`` as holding ``token_ids`` right after ``parent``'s prefix (``None``:
        the first block, which carries the salt)."""
        assert block_id not in self._entries, f"block {block_id} is already cached"
        assert len(token_ids) == self.block_size, "only full blocks are cached"
        token_ids = tuple(token_ids)
        salt = (salt or None) if parent is None else None
        parent_hash = None if parent is None else parent.block_hash
        block_hash = self.hash_fn(parent_hash, token_ids, salt)
        twin = self._find(parent, token_ids, salt, block_hash)
        entry = CacheEntry(
            block_id=block_id,
            block_hash=block_hash,
            parent_hash=parent_hash,
            token_ids=token_ids,
            salt=salt,
            prefix_id=twin.prefix_id if twin is not None else next(self._prefix_ids),
            parent_prefix_id=None if parent is None else parent.prefix_id,
        )
        self._entries[block_id] = entry
        self._by_hash.setdefault(block_hash, {})[block_id] = entry
        return entry

    def remove(self, block_id: int) -> None:
        """Forget ``block_id`` (it is about to hold other tokens). No-op if not cached."""
        entry = self._entries.pop(block_id, None)
        if entry is None:
            return
        same_hash = self._by_hash[entry.block_hash]
        del same_hash[block_id]
        if not same_hash:
            del self._by_hash[entry.block_hash]

    def clear(self) -> None:
        self._entries.clear()
        self._by_hash.clear()

    def check_integrity(self) -> None:
        indexed = [e for group in self._by_hash.values() for e in group.values()]
        assert len(indexed) == len(self._entries), "hash index and entries disagree"
        for block_hash, group in self._by_hash.items():
            assert group, "empty hash bucket"
            for block_id, entry in group.items():
                assert self._entries.get(block_id) is entry, f"block {block_id} indexed but not cached"
                assert entry.block_hash == block_hash
                assert len(entry.token_ids) == self.block_size, f"block {block_id} is not full"
                recomputed = self.hash_fn(entry.parent_hash, entry.token_ids, entry.salt)
                assert recomputed == block_hash, f"block {block_id}'s tokens do not hash to its key"
                assert (entry.parent_hash is None) == (entry.parent_prefix_id is None)

    def _find(self, parent: CacheEntry | None, token_ids: tuple[int, ...], salt: str | None,
              block_hash: BlockHash | None = None) -> CacheEntry | None:
        salt = (salt or None) if parent is None else None
        if block_hash is None:
            block_hash = self.hash_fn(None if parent is None else parent.block_hash, token_ids, salt)
        parent_prefix_id = None if parent is None else parent.prefix_id
        for entry in self._by_hash.get(block_hash, {}).values():
            if (entry.token_ids == token_ids and entry.parent_prefix_id == parent_prefix_id
                    and entry.salt == salt):
                return entry
        return None
