"""Paged prefill attention with a cached prefix: every new token attends causally to its
request's cached prefix and the new tokens, all read through the block table."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.paged_attention import (
    LOG2E,
    MASKED_MAX,
    attend_kv_tile,
    check_paged_shapes,
    dot_precision,
)
from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _prefill_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_reqs, qk_scale, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt_req,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, SKIP_DECODE: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_tokens // BLOCK_Q + num_reqs, num_kv_heads)``.

    A program owns BLOCK_Q consecutive new tokens of one request and the GROUP query heads that
    share one kv head, packed as BLOCK_M = BLOCK_Q * GROUP (padded) rows ``row -> (token
    row // GROUP, head row % GROUP)``, so each K/V tile is read once for the whole group. Request
    r owns tiles ``[query_start_loc[r] // BLOCK_Q + r, ...)``: an upper bound on the tiles before
    it, so the grid needs no host sync and the few surplus programs exit at once. Keys are tiled
    BLOCK_N at a time: tiles every row sees in full skip the masks; tiles wholly outside the
    sliding window are never read. With SKIP_DECODE, requests with one new token are left to the
    decode kernel.
    """
    pdl_prologue(USE_PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Binary search: the last request whose first tile is <= this tile.
    lo = 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    req = lo
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    tok0 = (tile - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if tok0 >= q_len:
        return
    if SKIP_DECODE:
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = context_len + tok
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + tok) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    # Keys [kv_lo, kv_hi) are visible to some row, [full_lo, full_hi) to every row: tiles in the
    # middle run [mid_lo, mid_hi) skip the masks, the (few) tiles before and after it do not.
    first_pos = context_len + tok0
    last_pos = context_len + tl.minimum(tok0 + BLOCK_Q, q_len) - 1
    kv_hi = last_pos + 1
    full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N
    if USE_WINDOW:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N
    else:
        kv_lo = 0
        full_lo = 0
    tile_lo = kv_lo // BLOCK_N * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(full_lo, tile_lo), kv_hi)
    mid_hi = tl.maximum(mid_lo, full_hi)

    block_table_ptr = block_tables_ptr + req * stride_bt_req
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], MASKED_MAX, dtype=tl.float32)
    for start in range(tile_lo, mid_lo, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start, kv_lo, kv_hi, kv_head,
            stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
            qk_scale, window, BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, USE_WINDOW, DOT_PRECISION,
        )
    for start in range(mid_lo, mid_hi, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start, kv_lo, kv_hi, kv_head,
            stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
            qk_scale, window, BLOCK_N, HEAD_DIM, BLOCK_SIZE, False, USE_WINDOW, DOT_PRECISION,
        )
    for start in range(mid_hi, kv_hi, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start, kv_lo, kv_hi, kv_head,
            stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
            qk_scale, window, BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, USE_WINDOW, DOT_PRECISION,
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_rows = (q_start + tok) * stride_o_tok + head * stride_o_head
    o_ptrs = out_ptr + o_rows[:, None] + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    skip_decode: bool = False,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``[num_tokens, num_heads, head_dim]`` (request r's new tokens are
    rows ``query_start_loc[r]:query_start_loc[r+1]``, at the last positions of its
    ``seq_lens[r]``) over the paged caches ``[num_blocks, block_size, num_kv_heads, head_dim]``,
    which already hold these tokens' keys and values. Returns ``out`` (same shape as ``query``).

    ``skip_decode`` leaves the rows of requests with one new token unwritten (``decode_attention``
    with ``query_start_loc`` computes them). ``block_m`` is the number of packed (token, head) rows
    per program (by default 128 for head_dim <= 128, down to 64 when ``max_query_len`` is short),
    ``block_n`` the keys per tile; both powers of two, at least 16. No host syncs.
    """
    check_paged_shapes(query, key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_reqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_reqs + 1,) and block_tables.shape[0] == num_reqs
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_reqs == 0:
        return out
    big = head_dim > 128
    if block_m is None:
        block_m = 64 if big else 128
        if max_query_len is not None:
            # 64 rows is one Hopper warpgroup MMA: fewer rows do not run faster (measured, H200).
            block_m = max(64, min(block_m, triton.next_power_of_2(max_query_len * group)))
    block_n = block_n or (32 if big else 64)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _prefill_attention_kernel[grid](
        query, key_cache, value_cache, out,
        block_tables, seq_lens, query_start_loc,
        num_reqs, scale * LOG2E, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1],
        USE_WINDOW=bool(sliding_window), DOT_PRECISION=dot_precision(query.dtype), SKIP_DECODE=skip_decode,
        num_warps=num_warps or (8 if block_m * head_dim >= 128 * 128 else 4),
        num_stages=num_stages or 2,
        **pdl_args(query.device),
    )
    return out
