"""Per-step attention metadata, and the forward context that carries it to every attention layer.

The runner builds one ``AttentionMetadata`` per step and sets it, with the chosen backend, for
the duration of the model's forward; attention layers read it with ``get_forward_context()``
instead of having it threaded through every module signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.attention.backend import AttentionBackend


@dataclass(slots=True)
class AttentionMetadata:
    """Where a flattened batch's new tokens go in the paged KV cache, and what each attends to.

    Request ``i`` owns new tokens ``query_start_loc[i]:query_start_loc[i+1]`` of the batch;
    they sit at positions ``seq_lens[i] - num_new .. seq_lens[i] - 1`` of its sequence, and
    attend causally to every earlier position, which its block table maps to cache slots::

        position p  ->  slot = block_tables[i, p // block_size] * block_size + p % block_size
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [num_reqs] int32: KV length of each request after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, padded with 0
    max_query_len: int
    # A bound on seq_lens: exact in eager steps; in a CUDA graph, the graph's (the longest possible,
    # or a short-context decode graph's SHORT_SEQ_LEN, engine/cuda_graph.py).
    max_seq_len: int
    # [num_reqs] int32: the requests by decreasing seq_len, the order decode kernels start them in
    # (the longest first leaves short ones to fill the last wave); None: batch order.
    decode_order: torch.Tensor | None = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


@dataclass(slots=True)
class ForwardContext:
    metadata: AttentionMetadata
    backend: AttentionBackend


_context: ForwardContext | None = None


@contextmanager
def set_forward_context(metadata: AttentionMetadata, backend: AttentionBackend) -> Iterator[ForwardContext]:
    """Make ``metadata`` and ``backend`` visible to attention layers for one forward."""
    global _context
    previous, _context = _context, ForwardContext(metadata, backend)
    try:
        yield _context
    finally:
        _context = previous


def get_forward_context() -> ForwardContext:
    assert _context is not None, "attention ran outside set_forward_context()"
    return _context
