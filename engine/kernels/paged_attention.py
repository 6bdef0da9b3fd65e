"""The step both paged attention kernels (prefill and decode) are built from: one tile of keys and
values read through a block table, folded into a running online softmax.

::

    key positions  start ............ start + BLOCK_N
    logical block  j // BLOCK_SIZE -> block_table[...] -> physical block b
    address        b * stride_block + (j % BLOCK_SIZE) * stride_slot + kv_head * stride_head + d

Every column gathers its own physical block, so BLOCK_N need not equal the cache's block size
and tiles need not start on a block boundary. Scores live in the log2 domain (``qk_scale``
already holds log2(e)), so the softmax uses ``exp2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The running max starts finite so a row with nothing visible yet stays 0 instead of NaN.
MASKED_MAX = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634


@triton.jit
def load_kv_tile(
    key_cache_ptr, value_cache_ptr, block_table_ptr, start, kv_lo, kv_hi, kv_head,
    stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr,
):
    """Keys ``[start, start + BLOCK_N)`` as ``k [HEAD_DIM, BLOCK_N]`` and ``v [BLOCK_N, HEAD_DIM]``.
    With ``MASK`` only columns in ``[kv_lo, kv_hi)`` are read (block-table entries outside it are
    never dereferenced; the others are zeros)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASK:
        col_ok = (offs_n >= kv_lo) & (offs_n < kv_hi)
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=col_ok, other=0).to(tl.int64)
    else:
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE).to(tl.int64)
    slot_in_block = offs_n % BLOCK_SIZE
    k_off = block_ids * stride_kc_block + slot_in_block * stride_kc_slot + kv_head * stride_kc_head
    v_off = block_ids * stride_vc_block + slot_in_block * stride_vc_slot + kv_head * stride_vc_head
    if MASK:
        k = tl.load(key_cache_ptr + k_off[None, :] + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(value_cache_ptr + v_off[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(key_cache_ptr + k_off[None, :] + offs_d[:, None])
        v = tl.load(value_cache_ptr + v_off[:, None] + offs_d[None, :])
    return k, v


@triton.jit
def fold_kv_tile(
    acc, l_i, m_i, q, q_pos, k, v, start, kv_lo, kv_hi, qk_scale, window,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold the tile of keys ``[start, start + BLOCK_N)`` (``k``, ``v`` as ``load_kv_tile`` gives
    them) into ``(acc, l_i, m_i)`` for the query rows ``q [BLOCK_M, HEAD_DIM]`` at positions
    ``q_pos [BLOCK_M]``. With ``MASK`` each row sees only columns in ``[kv_lo, kv_hi)`` with
    ``j <= q_pos`` (and ``j > q_pos - window`` with ``USE_WINDOW``); without it the caller
    guarantees every column is visible to every row."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if MASK:
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = (offs_n[None, :] >= kv_lo) & (offs_n[None, :] < kv_hi) & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend_kv_tile(
    acc, l_i, m_i, q, q_pos,
    key_cache_ptr, value_cache_ptr, block_table_ptr,
    start, kv_lo, kv_hi, kv_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    qk_scale, window,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``load_kv_tile`` then ``fold_kv_tile``, with the same ``[kv_lo, kv_hi)`` for both."""
    k, v = load_kv_tile(
        key_cache_ptr, value_cache_ptr, block_table_ptr, start, kv_lo, kv_hi, kv_head,
        stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
        BLOCK_N, HEAD_DIM, BLOCK_SIZE, MASK,
    )
    return fold_kv_tile(acc, l_i, m_i, q, q_pos, k, v, start, kv_lo, kv_hi, qk_scale, window,
                        BLOCK_N, MASK, USE_WINDOW, DOT_PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not be rounded to tf32 on the tensor cores (tests compare at 1e-4)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_shapes(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Shape rules shared by both kernels."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    assert value_cache.shape == key_cache.shape and key_cache.shape[3] == head_dim
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0, "head_dim: a power of two in [16, 256]"
    assert query.dtype == key_cache.dtype == value_cache.dtype
    for t in (query, key_cache, value_cache):
        assert t.stride(-1) == 1, "the last dim must be contiguous"
