"""Scheduler configuration: one frozen dataclass, built by the engine from its arguments."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.prefix_cache import available_hash_algos


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step and of the KV block pool.

    ``num_blocks`` counts every block of the KV cache, including block 0, which the block
    manager keeps as the null block (see ``scheduler.block_manager.NULL_BLOCK_ID``).
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    sliding_window: int | None = None
    max_waiting_requests: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {self.num_blocks}")
        # Otherwise a full batch of decodes could take the whole budget and no prefill would ever start.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.prefix_caching_hash_algo not in available_hash_algos():
            raise ValueError(
                f"prefix_caching_hash_algo must be one of {sorted(available_hash_algos())}, "
                f"got {self.prefix_caching_hash_algo!r}"
            )
        # A lone request must always fit, or preemption could never make room for it.
        if self.max_blocks_per_request > self.num_usable_blocks:
            raise ValueError(
                f"the KV cache ({self.num_usable_blocks} blocks of {self.block_size} tokens) cannot hold "
                f"one sequence of max_model_len={self.max_model_len} tokens; lower max_model_len or "
                f"add blocks"
            )

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def max_blocks_per_request(self) -> int:
        """The most blocks one request ever holds at once."""
        full = cdiv(self.max_model_len, self.block_size)
        if self.sliding_window is None:
            return full
        # The window, plus one step's chunk, plus the partial blocks at either end.
        windowed = (self.sliding_window + self.max_num_batched_tokens) // self.block_size + 2
        return min(full, windowed)
