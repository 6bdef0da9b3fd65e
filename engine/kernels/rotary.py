"""Rotary position embedding, neox style (rotate_half), applied in place to q and k in one launch.

Each output element is ``x1 * cos - x2 * sin`` (first half) or ``x2 * cos + x1 * sin`` (second
half), computed in float32 from the float32 cos/sin caches and rounded once to q's dtype. The
layer's torch code (engine/layers/rotary.py) rounds cos/sin and each product to q's dtype first,
so in 16-bit dtypes the two differ by rounding; in float32 they agree to the last bits.

One launch replaces the layer's 16 torch kernels in bf16 (gathering and widening cos/sin, then
multiplies, negations, concatenations and adds for q and for k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(base_ptr, num_heads, stride_head, half_dim, cos, sin, dims, BLOCK_H: tl.constexpr):
    # Rotates the heads of one token in place: their first halves at dims, second halves half_dim on.
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < num_heads) & (dims < half_dim)
    first_ptrs = base_ptr + heads * stride_head + dims
    x1 = tl.load(first_ptrs, mask=mask, other=0.0)
    x2 = tl.load(first_ptrs + half_dim, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first_ptrs, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first_ptrs + half_dim, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_kv_heads, half_dim,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache_pos,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Grid ``(num_tokens,)``: one program reads its token's cos/sin row once and rotates all of
    its q heads as one ``[BLOCK_HQ, BLOCK_HALF]`` tile, then all k heads as ``[BLOCK_HK,
    BLOCK_HALF]`` (heads and half the head dim padded to powers of two and masked). Assumes the
    last dim of q and k is contiguous and that every position is below the caches' length."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cache_pos + dims, mask=dims < half_dim, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache_pos + dims, mask=dims < half_dim, other=0.0)
    _rotate_heads(q_ptr + tok * stride_q_tok, num_q_heads, stride_q_head, half_dim, cos, sin, dims, BLOCK_HQ)
    _rotate_heads(k_ptr + tok * stride_k_tok, num_kv_heads, stride_k_head, half_dim, cos, sin, dims, BLOCK_HK)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    *,
    num_warps: int = 4,
) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]``. q and k may be
    non-contiguous views (e.g. split from a fused qkv output) with a contiguous last dim.
    ``cos_cache``/``sin_cache`` ``[max_position, D // 2]`` float32. No host syncs."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and k.dtype == q.dtype
    assert positions.shape == (num_tokens,)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "the last dim of q and k must be contiguous"
    half_dim = head_dim // 2
    assert cos_cache.shape[1] == half_dim and sin_cache.shape == cos_cache.shape
    assert cos_cache.dtype == sin_cache.dtype == torch.float32
    assert cos_cache.stride(1) == 1 and sin_cache.stride() == cos_cache.stride()
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_cache, sin_cache,
        num_q_heads, num_kv_heads, half_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half_dim),
        num_warps=num_warps,
    )
