"""The reference attention backend: plain PyTorch, exact, one request at a time.

Every other backend is tested against this one, so it favours clarity: it gathers each
request's keys and values block by block through its block table and computes an explicit
masked softmax in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new tokens' ``k``, ``v [T, Hkv, D]`` at ``slot_mapping [T]`` of the paged caches."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Grouped-query attention of ``q [Lq, H, D]`` over ``k``, ``v [Lk, Hkv, D]``, where a
    query at position p sees keys at positions in ``(p - sliding_window, p]``."""
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    groups = num_heads // num_kv_heads
    qf = q.float().view(num_q, num_kv_heads, groups, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale
    allowed = k_positions[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        allowed &= k_positions[None, :] > q_positions[:, None] - sliding_window
    scores.masked_fill_(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return out.reshape(num_q, num_heads, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query token per request, all requests at once: gather every request's blocks into a
    padded ``[B, L, Hkv, D]`` batch and mask past its length (and outside its window). Padding
    and released entries of the block table point at the null block, whose slots are masked."""
    num_reqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    num_blocks = -(-metadata.max_seq_len // block_size)
    tables = metadata.block_tables[:, :num_blocks].long()
    keys = k_cache[tables].flatten(1, 2).float()  # [B, L, Hkv, D]
    values = v_cache[tables].flatten(1, 2).float()
    key_pos = torch.arange(keys.shape[1], device=q.device)
    q_pos = metadata.seq_lens.long() - 1
    allowed = key_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= key_pos[None, :] > q_pos[:, None] - sliding_window
    # Slots past a request's length may hold anything (even NaN): zero them so 0 * garbage never leaks.
    values = values.masked_fill(~allowed[:, :, None, None], 0.0)
    qf = q.float().view(num_reqs, num_kv_heads, groups, head_dim)
    scores = torch.einsum("bhgd,bkhd->bhgk", qf, keys) * scale
    scores.masked_fill_(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgk,bkhd->bhgd", scores.softmax(dim=-1), values)
    return out.reshape(num_reqs, num_heads, head_dim).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        layer: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_reqs:
            return decode_attention(q, k_cache, v_cache, metadata, scale, sliding_window)
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)
        device = q.device
        starts = metadata.query_start_loc.tolist()
        for i, seq_len in enumerate(metadata.seq_lens.tolist()):
            begin, end = starts[i], starts[i + 1]
            if begin == end:
                continue
            first_query_pos = seq_len - (end - begin)
            # Read only blocks that some query can see: freed (null) blocks lie wholly before them.
            lowest_visible = 0 if sliding_window is None else max(0, first_query_pos - sliding_window + 1)
            first_block = lowest_visible // block_size
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[i, first_block:num_blocks].long()
            key_start = first_block * block_size
            keys = k_cache[blocks].flatten(0, 1)[: seq_len - key_start]
            values = v_cache[blocks].flatten(0, 1)[: seq_len - key_start]
            out[begin:end] = causal_attention(
                q[begin:end],
                keys,
                values,
                torch.arange(first_query_pos, seq_len, device=device),
                torch.arange(key_start, seq_len, device=device),
                scale,
                sliding_window,
            )
        return out
