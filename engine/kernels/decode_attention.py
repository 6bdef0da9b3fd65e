"""Paged decode attention, split over the KV length (flash-decoding): one query token per
request; each split folds its share of the keys into a partial (output, log-sum-exp), and a
second kernel combines the splits. CUDA-graph safe: no host syncs, and the split boundaries are
computed on the device from ``seq_lens``, so one captured launch serves any lengths.

::

    request r, kv head h:   keys [kv_lo ............................ seq_len)
    splits (NUM_SPLITS=3):  | split 0      | split 1      | split 2 |
                            each a multiple of BLOCK_N long, the last one short or empty
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.paged_attention import (
    LOG2E,
    MASKED_MAX,
    attend_kv_tile,
    check_paged_shapes,
    dot_precision,
    fold_kv_tile,
    load_kv_tile,
)
from engine.kernels.pdl import pdl_args, pdl_prologue

# Hopper H200/H100 SXM; used when there is no CUDA device to ask (the interpreter).
DEFAULT_NUM_SMS = 132
# Where a request's keys are cut into MAX_SPLITS and no request is longer than SHORT_SEQ_LEN (by
# the ``max_seq_len`` bound), split programs take 32-key tiles instead of 64: most then fold one
# tile (H200, Llama-3.1-8B heads, one request, 16 splits, bench/results/decode_attention_tiles_s31.json:
# 256 / 384 / 1,100 keys 4.2 / 4.5 / 6.7 us against 5.4-5.6 / 5.3-5.5 / 7.0; but 4,096 keys 12.1-12.3
# against 10.2-10.4, and an eager step's few long splits at 256 keys 7.2 against 6.4-6.5). The
# decode CUDA graph of one request is captured for this bound too (engine/cuda_graph.py).
SHORT_SEQ_LEN = 2048
MAX_SPLITS = 16


@triton.jit
def _split_span(seq_lens_ptr, req, window, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    # Request req's keys [kv_lo, seq_len) and the length of each of its splits (a multiple of
    # BLOCK_N; 0 without keys): splits at or past cdiv(seq_len - kv_lo, split_len) are empty.
    seq_len = tl.load(seq_lens_ptr + req)
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)
    else:
        kv_lo = 0
    return seq_len, kv_lo, tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _wait_then_query(q_ptr, row, kv_head, new, stride_q_row, stride_q_head,
                     GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PDL: tl.constexpr):
    # The PDL wait (the kernel ahead writes q), then the kv head's GROUP query rows padded to
    # BLOCK_H, their position, and an empty online-softmax state.
    pdl_prologue(USE_PDL)
    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = row * stride_q_row + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + new
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], MASKED_MAX, dtype=tl.float32)
    return q, q_pos, head, row_ok, offs_d, acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, order_ptr,
    num_heads, qk_scale, window,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt_req,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, MIXED: tl.constexpr, HAS_ORDER: tl.constexpr,
    EARLY_TILE: tl.constexpr = True, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_reqs, num_kv_heads, NUM_SPLITS)``. Program p takes request p, or with HAS_ORDER
    request ``order[p]``: the GPU starts programs about in order, so an order by decreasing
    length starts the longest first and leaves short ones to fill the last wave.

    Request r's query is row r; with MIXED it is row ``query_start_loc[r]`` and requests that
    do not have exactly one new token are left to the prefill kernel.

    A program takes the GROUP query heads of one kv head as BLOCK_H (>= 16, padded) rows, so each
    K/V tile is read once per group, and walks its split BLOCK_N keys at a time. With EARLY_TILE
    the split's first tile is read before the PDL wait (but for the new token's key and value,
    which the kernel ahead writes): it and the last, partial tile are masked. Without it every
    load follows the wait and only the last tile is masked: a program that folds many tiles gains
    nothing from the early tile, and holding it through the wait costs the loop registers (4 warps,
    128-key tiles, sm_90: 255 registers and a spill against 168). With NUM_SPLITS == 1 it writes
    the final output directly; otherwise the normalised partial output and its log2-sum-exp go
    to ``part_out`` ``[num_reqs, num_heads, NUM_SPLITS, HEAD_DIM]`` and ``part_lse`` ``[num_reqs,
    num_heads, NUM_SPLITS]``; a split without keys exits at once, writing nothing (the reduction
    reads only the splits that have keys).
    """
    # Up to the PDL wait the program reads only what this step's host-to-device copies wrote (the
    # order, rows, lengths and block tables) and, with EARLY_TILE, what earlier steps wrote to the
    # cache (every key and value but the new token's): its first tile's loads overlap the kernel
    # ahead, which writes q and the new token's key and value. Those are read after the wait.
    if HAS_ORDER:
        req = tl.load(order_ptr + tl.program_id(0))
    else:
        req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if MIXED:
        row = tl.load(query_start_loc_ptr + req)
        if tl.load(query_start_loc_ptr + req + 1) - row != 1:
            pdl_prologue(USE_PDL)  # a batch may have no decode row: the kernel still waits (pdl.py)
            return
    else:
        row = req
    seq_len, kv_lo, split_len = _split_span(seq_lens_ptr, req, window, NUM_SPLITS, BLOCK_N, USE_WINDOW)
    split_lo = kv_lo + split * split_len
    split_hi = tl.minimum(split_lo + split_len, seq_len)
    if NUM_SPLITS > 1:
        if split_lo >= split_hi:
            # An empty split (a graph's surplus at a short length) writes nothing: the reduction skips
            # it. Split 0 of a request with keys always waits, so the kernel never finishes early.
            return
    full_hi = split_lo + tl.maximum(split_hi - split_lo, 0) // BLOCK_N * BLOCK_N
    first_hi = tl.minimum(split_lo + BLOCK_N, split_hi)

    block_table_ptr = block_tables_ptr + req * stride_bt_req
    new = seq_len - 1  # the new token's position
    if EARLY_TILE:
        k, v = load_kv_tile(key_cache_ptr, value_cache_ptr, block_table_ptr, split_lo, split_lo,
                            tl.minimum(first_hi, new), kv_head, stride_kc_block, stride_kc_slot, stride_kc_head,
                            stride_vc_block, stride_vc_slot, stride_vc_head, BLOCK_N, HEAD_DIM, BLOCK_SIZE, True)
        holds_new = (new >= split_lo) & (new < first_hi)
        new_block = tl.load(block_table_ptr + tl.where(holds_new, new, 0) // BLOCK_SIZE).to(tl.int64)
        q, q_pos, head, row_ok, offs_d, acc, l_i, m_i = _wait_then_query(
            q_ptr, row, kv_head, new, stride_q_row, stride_q_head, GROUP, BLOCK_H, HEAD_DIM, USE_PDL)
        new_slot = new % BLOCK_SIZE
        new_d = offs_d < tl.where(holds_new, HEAD_DIM, 0)  # all of the row, or none
        k_new = tl.load(key_cache_ptr + new_block * stride_kc_block + new_slot * stride_kc_slot
                        + kv_head * stride_kc_head + offs_d, mask=new_d, other=0.0)
        v_new = tl.load(value_cache_ptr + new_block * stride_vc_block + new_slot * stride_vc_slot
                        + kv_head * stride_vc_head + offs_d, mask=new_d, other=0.0)
        is_new = split_lo + tl.arange(0, BLOCK_N) == new
        k = tl.where(is_new[None, :], k_new[:, None], k)
        v = tl.where(is_new[:, None], v_new[None, :], v)
        acc, l_i, m_i = fold_kv_tile(acc, l_i, m_i, q, q_pos, k, v, split_lo, split_lo, first_hi, qk_scale,
                                     window, BLOCK_N, True, USE_WINDOW, DOT_PRECISION)
        loop_lo = split_lo + BLOCK_N
    else:
        q, q_pos, head, row_ok, offs_d, acc, l_i, m_i = _wait_then_query(
            q_ptr, row, kv_head, new, stride_q_row, stride_q_head, GROUP, BLOCK_H, HEAD_DIM, USE_PDL)
        loop_lo = split_lo
    for start in range(loop_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start, split_lo, split_hi, kv_head,
            stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
            qk_scale, window, BLOCK_N, HEAD_DIM, BLOCK_SIZE, False, USE_WINDOW, DOT_PRECISION,
        )
    for start in range(tl.maximum(full_hi, loop_lo), split_hi, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(
            acc, l_i, m_i, q, q_pos, key_cache_ptr, value_cache_ptr, block_table_ptr,
            start, split_lo, split_hi, kv_head,
            stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
            qk_scale, window, BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, USE_WINDOW, DOT_PRECISION,
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_rows = row * stride_o_row + head * stride_o_head
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        part = (req * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
    num_heads, window, stride_o_row, stride_o_head,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, MIXED: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_reqs, num_heads)``: weight each split that has keys (the split kernel's
    division of the request's length) by exp2(lse - max lse) and normalise; a request with no
    keys at all (a padded row) gets zeros. Rows as in the split kernel."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    # Before the PDL wait: the row and the length (this step's host-to-device copy).
    if MIXED:
        row = tl.load(query_start_loc_ptr + req)
        if tl.load(query_start_loc_ptr + req + 1) - row != 1:
            pdl_prologue(USE_PDL)  # as in the split kernel
            return
    else:
        row = req
    seq_len, kv_lo, split_len = _split_span(seq_lens_ptr, req, window, NUM_SPLITS, BLOCK_N, USE_WINDOW)
    used = tl.cdiv(seq_len - kv_lo, tl.maximum(split_len, 1))
    pdl_prologue(USE_PDL)
    splits = tl.arange(0, SPLITS_P2)
    split_ok = splits < used
    offs_d = tl.arange(0, HEAD_DIM)
    part = (req * num_heads + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.maximum(tl.max(lse, 0), MASKED_MAX))
    part_ptrs = part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :]
    parts = tl.load(part_ptrs, mask=split_ok[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * stride_o_row + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_num_splits(
    num_reqs: int,
    num_kv_heads: int,
    max_seq_len: int | None,
    *,
    sms: int = DEFAULT_NUM_SMS,
    waves: int = 2,
    min_split_len: int = 128,
    max_splits: int = MAX_SPLITS,
) -> int:
    """Splits per (request, kv head) so that about ``waves * sms`` programs run, at most
    ``max_splits`` (at batch 1 on an H200, 16 splits stream 4,096 keys as fast as 33 and 1,024
    faster: the partials' reduction grows with them), no split shorter than ``min_split_len``
    keys, and big batches (which fill the GPU alone) get one.
    ``max_seq_len`` is a bound on the lengths (None: none); a CUDA graph's, replayed at any length
    under it (the block tables' full length, or SHORT_SEQ_LEN), leaves surplus splits to short
    sequences, which exit at once."""
    programs = max(num_reqs * num_kv_heads, 1)
    splits = min(triton.cdiv(waves * sms, programs), max_splits)
    if max_seq_len is not None:
        splits = min(splits, triton.cdiv(max(max_seq_len, 1), min_split_len))
    return max(1, splits)


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    query_start_loc: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    order: torch.Tensor | None = None,
    combine: bool = True,
    early_tile: bool | None = None,
) -> torch.Tensor | DecodeSplits:
    """Attention of one new token per request at position ``seq_lens[r] - 1`` over the paged
    caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` (which already hold that token's
    key and value). ``query`` is ``[num_reqs, num_heads, head_dim]``; or, given
    ``query_start_loc``, a mixed batch ``[num_tokens, num_heads, head_dim]`` of which only the
    rows of requests with exactly one new token are computed (and written to ``out``).
    ``num_splits`` defaults to ``decode_num_splits(..., max_seq_len)``, and the tiles' width
    (``block_n``) to one by the split count and ``max_seq_len``. ``order`` (int32
    ``[num_reqs]``, a permutation) is the order in which requests' programs start: longest first
    balances a batch of mixed lengths. ``combine=False``: where the keys are split (and not
    ``query_start_loc``), the splits' partials as ``DecodeSplits`` instead of the output, for the
    kernel after to combine as it loads them (``DecodeSplits.combine()`` launches the reduction).
    ``early_tile``: a program reads its first tile before the PDL wait (default: where the keys
    are split, so programs are short; one split a program means long programs, a big batch).
    No host syncs."""
    check_paged_shapes(query, key_cache, value_cache)
    num_heads, head_dim = query.shape[1:]
    num_reqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    mixed = query_start_loc is not None
    assert block_tables.shape[0] == num_reqs
    if mixed:
        assert query_start_loc.shape == (num_reqs + 1,)
    else:
        assert query.shape[0] == num_reqs
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0:
        return out
    sms = num_sms(query.device)
    if num_splits is None:
        num_splits = decode_num_splits(num_reqs, num_kv_heads, max_seq_len, sms=sms)
    # One split per program (big batches): long tiles, 2% faster than 64 on a mixed-length batch of 256
    # (bench/results/decode_attention_order_sweep_h200.json); split programs keep shorter ones, and
    # shorter still where every request is short (SHORT_SEQ_LEN).
    if not block_n:
        short = max_seq_len is not None and max_seq_len <= SHORT_SEQ_LEN and num_splits == MAX_SPLITS
        block_n = 32 if head_dim > 128 or short else 128 if num_splits == 1 else 64
    if num_splits > 1:
        part_out = query.new_empty((num_reqs, num_heads, num_splits, head_dim), dtype=torch.float32)
        part_lse = query.new_empty((num_reqs, num_heads, num_splits), dtype=torch.float32)
    else:
        part_out = part_lse = out  # not read: the split kernel writes ``out`` itself
    qsl = query_start_loc if mixed else seq_lens  # not read unless MIXED
    # At most one program an SM (batch 1): 8 warps share its tile's loads and dots.
    num_warps = num_warps or (8 if num_reqs * num_kv_heads * num_splits <= sms else 4)
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, out, part_out, part_lse,
        block_tables, seq_lens, qsl, seq_lens if order is None else order,
        num_heads, scale * LOG2E, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], NUM_SPLITS=num_splits,
        USE_WINDOW=bool(sliding_window), DOT_PRECISION=dot_precision(query.dtype), MIXED=mixed,
        HAS_ORDER=order is not None, EARLY_TILE=num_splits > 1 if early_tile is None else early_tile,
        num_warps=num_warps, num_stages=num_stages or 2,
        **pdl_args(query.device),
    )
    if num_splits == 1:
        return out
    splits = DecodeSplits(out, part_out, part_lse, seq_lens, sliding_window or 0, block_n)
    if not combine and not mixed:
        return splits
    _combine(splits, query_start_loc)
    return out


@dataclass(frozen=True, slots=True)
class DecodeSplits:
    """The split kernel's partials for one new token a request (request r's row r, no mixed
    batch): ``part_out`` fp32 ``[R, H, S, D]`` (normalised), ``part_lse`` fp32 ``[R, H, S]``
    (log2-sum-exp), of which request r's first ``cdiv(seq_len - kv_lo, split_len)`` splits hold
    keys (``_split_span`` with ``window`` and ``block_n``); ``out`` ``[R, H, D]``, the output's
    buffer, unwritten until ``combine()``."""

    out: torch.Tensor
    part_out: torch.Tensor
    part_lse: torch.Tensor
    seq_lens: torch.Tensor
    window: int
    block_n: int

    def combine(self) -> torch.Tensor:
        """Launch the reduction into ``out`` and return it."""
        _combine(self, None)
        return self.out


def _combine(splits: DecodeSplits, query_start_loc: torch.Tensor | None) -> None:
    out, part_out = splits.out, splits.part_out
    num_reqs, num_heads, num_splits, head_dim = part_out.shape
    mixed = query_start_loc is not None
    _decode_reduce_kernel[(num_reqs, num_heads)](
        part_out, splits.part_lse, out, query_start_loc if mixed else splits.seq_lens, splits.seq_lens, num_heads,
        splits.window, out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        BLOCK_N=splits.block_n, USE_WINDOW=bool(splits.window), MIXED=mixed,
        num_warps=4 if head_dim * num_splits >= 4096 else 1, **pdl_args(part_out.device),
    )
