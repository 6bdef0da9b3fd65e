"""The ``flash_attn`` backend: the FlashAttention package's paged kernels.

::

    Hopper / Blackwell (sm90+):  FlashAttention-4, flash_attn.cute.flash_attn_varlen_func
                                 q varlen (cu_seqlens_q) or (batch, 1, heads, dim) for decode,
                                 K/V read through page_table with seqused_k
    Ampere (sm80-89):            FlashAttention-2, flash_attn.flash_attn_varlen_func with
                                 block_table and cu_seqlens_k

New K/V are written by our reshape-and-cache kernel first, so the cache layout is the one every
backend shares, ``[num_blocks, block_size, kv_heads, head_dim]`` (FlashAttention's paged layout).
The causal mask is aligned to the end of each sequence (query i of q_len new tokens sees keys
``<= seq_len - q_len + i``), which is what a prefix-cached chunk needs. A sliding window W
keeps keys ``> p - W``: FlashAttention's left window ``W - 1``.

FlashAttention-4 splits the KV of a sequence across CTAs only on sm100+; on sm90 a decode batch
too small to give every SM a (request, kv head) goes to our split-KV decode kernel instead.

Graph safety: every argument is a device tensor or a host int fixed by the shapes; in a CUDA
graph ``max_seq_len`` is a bound on every replay's lengths (the block tables' full length, or the
short-context decode graph's SHORT_SEQ_LEN, engine/cuda_graph.py), so the split count chosen at
capture serves every replay.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import DecodeSplits, decode_attention, num_sms
from engine.kernels.reshape_and_cache import reshape_and_cache


def _load(major: int) -> tuple[str, Callable] | None:
    """(API name, flash_attn_varlen_func) of the FlashAttention build for this architecture."""
    module = "flash_attn.cute" if major >= 9 else "flash_attn"
    try:
        return module, importlib.import_module(module).flash_attn_varlen_func
    except (ImportError, AttributeError):
        return None


class FlashAttentionBackend(AttentionBackend):
    name = "flash_attn"
    graph_safe = True
    accepts_cached_kv = True

    def __init__(self) -> None:
        self._api: str | None = None
        self._varlen: Callable | None = None
        self._num_splits = 1

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8 and _load(major) is not None

    def _function(self, device: torch.device) -> Callable:
        if self._varlen is None:
            loaded = _load(torch.cuda.get_device_capability(device)[0])
            assert loaded is not None, "flash_attn is not importable"
            self._api, self._varlen = loaded
            # FlashAttention-4 splits the KV of small decode batches only from sm100 on.
            self._num_splits = 0 if torch.cuda.get_device_capability(device)[0] >= 10 else 1
        return self._varlen

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
        varlen = self._function(q.device)
        decode = metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_reqs
        if decode and self._num_splits == 1 and metadata.num_reqs * k_cache.shape[2] < num_sms(q.device):
            # One CTA per (request, kv head) would leave most SMs idle: split the KV instead.
            paged = (k_cache, v_cache, metadata.block_tables, metadata.seq_lens)
            return decode_attention(q, *paged, scale, sliding_window, torch.empty_like(q),
                                    max_seq_len=metadata.max_seq_len, combine=not leave_splits)
        window = (sliding_window - 1, 0) if sliding_window is not None else (None, None)
        if self._api == "flash_attn.cute":
            return self._fa4(varlen, q, k_cache, v_cache, metadata, scale, window, self._num_splits)
        return self._fa2(varlen, q, k_cache, v_cache, metadata, scale, window)

    @staticmethod
    def _fa4(varlen: Callable, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             metadata: AttentionMetadata, scale: float, window: tuple[int | None, int | None],
             num_splits: int) -> torch.Tensor:
        common = dict(
            seqused_k=metadata.seq_lens, page_table=metadata.block_tables, max_seqlen_k=metadata.max_seq_len,
            softmax_scale=scale, causal=True, window_size=window,
            # 0: the library picks the number of KV splits, so small decode batches fill the GPU.
            num_splits=num_splits,
        )
        if metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_reqs:
            out = varlen(q.unsqueeze(1), k_cache, v_cache, **common)
            return _first(out).squeeze(1)
        out = varlen(q, k_cache, v_cache, cu_seqlens_q=metadata.query_start_loc,
                     max_seqlen_q=metadata.max_query_len, **common)
        return _first(out)

    @staticmethod
    def _fa2(varlen: Callable, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             metadata: AttentionMetadata, scale: float, window: tuple[int | None, int | None]) -> torch.Tensor:
        cu_seqlens_k = torch.nn.functional.pad(metadata.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return varlen(
            q, k_cache, v_cache, cu_seqlens_q=metadata.query_start_loc, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=metadata.max_query_len, max_seqlen_k=metadata.max_seq_len,
            softmax_scale=scale, causal=True,
            window_size=(-1, -1) if window[0] is None else (window[0], 0),
            block_table=metadata.block_tables,
        )


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    # FlashAttention-4 returns (out, lse) or out depending on the version.
    return out[0] if isinstance(out, tuple) else out
