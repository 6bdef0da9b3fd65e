"""The ``triton`` attention backend: our own paged kernels (engine/kernels).

::

    every request has 1 new token      -> split-KV decode kernel (+ split reduction, or with
                                           leave_splits the partials for the o projection)
    otherwise (prefill, chunks, verify) -> prefill-with-prefix kernel for requests with > 1 new
                                           token, and the decode kernel (reading its rows through
                                           query_start_loc) for those with exactly 1

Each request is computed by exactly one kernel, so a mixed batch's decode rows do not pay for
a prefill tile. Every choice is made from host-side shapes and metadata ints: no host syncs,
so the decode path can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import DecodeSplits, decode_attention
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.reshape_and_cache import reshape_and_cache


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    graph_safe = True
    accepts_cached_kv = True

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        # On CPU the kernels only run interpreted, far slower than the torch backend.
        return device.type == "cuda"

    def forward(
        self,
        layer: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        leave_splits: bool = False,
    ) -> torch.Tensor | DecodeSplits:
        k_cache, v_cache = kv_cache
        if k is not None:
            reshape_and_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        out = torch.empty_like(q)
        paged = (k_cache, v_cache, metadata.block_tables, metadata.seq_lens)
        max_seq_len = metadata.max_seq_len
        if metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_reqs:
            return decode_attention(q, *paged, scale, sliding_window, out, max_seq_len=max_seq_len,
                                    order=metadata.decode_order, combine=not leave_splits)
        prefill_attention(
            q, *paged, metadata.query_start_loc, scale, sliding_window, out,
            skip_decode=metadata.num_reqs > 1, max_query_len=metadata.max_query_len,
        )
        if metadata.num_reqs > 1:
            decode_attention(
                q, *paged, scale, sliding_window, out,
                query_start_loc=metadata.query_start_loc, max_seq_len=max_seq_len, order=metadata.decode_order,
            )
        return out
