"""A dense GEMV for few tokens: ``y = x @ W^T`` with ``x`` [M, K] (M <= 4) and an ``nn.Linear``
weight ``W`` [N, K], 16-bit or fp32, accumulated in fp32.

Decode at batch 1 reads every weight once per token, so the linears should stream the weights
at the memory's rate. For the small projections of a 0.6B model (4-12 MB) the vendor GEMV
kernels reach only 1-1.6 TB/s on an H200; this kernel gives every program a [BLOCK_N, K] slab of
rows (split over SPLIT_K programs along K when N alone makes too few programs), streams it in
[BLOCK_N, BLOCK_K] tiles with the K dimension contiguous, and keeps one fp32 accumulator tile
per token that is reduced over K once, at the end: the loop body is loads and FMAs only.

When a program's whole slab fits in its registers (up to ``SLAB_ELEMENTS`` weights a thread: every
linear of Qwen3-0.6B, none of Llama-3.1-8B's), it is one tile requested before the PDL wait
(weights are never written): with the kernels ahead placed early (engine/kernels/pdl.py's
``trigger_before_wait``) the weight streams while they run, and after the wait only the
activations are read. A slab's program may also take the RMSNorm before the linear (and the
residual add before that) into its loads (``gemv_rms_norm``): every program holds the token's whole
row, so each normalizes it itself and the norm needs no launch of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue

MAX_TOKENS = 4
# Weights a thread may hold for a one-tile slab (see the module docstring): 64 bf16 values, 32
# registers.
SLAB_ELEMENTS = 64


@triton.jit
def _x_tile(row_ptr, k, k_ok, K, SILU_MUL: tl.constexpr):
    x = tl.load(row_ptr + k, mask=k_ok, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(row_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _normed_x(x_ptr, residual_ptr, sum_ptr, norm_w, k, k_ok, K, eps, store_sum, HAS_RESIDUAL: tl.constexpr):
    # One token's row through engine/kernels/rms_norm.py's math and roundings: x + residual in x's
    # dtype (stored to sum_ptr where store_sum), normalized in fp32, rounded, times the weight,
    # rounded.
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + k, mask=k_ok, other=0.0).to(tl.float32)).to(dtype)
        if store_sum:
            tl.store(sum_ptr + k, x, mask=k_ok)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)
    return ((xf * rstd).to(dtype).to(tl.float32) * norm_w).to(dtype).to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, stride_wn, x_row1, x_row2, x_row3,
    residual_ptr, norm_w_ptr, sum_ptr, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr, SLAB: tl.constexpr = False,
    NORM: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``; program (p, s) computes rows ``[p * BLOCK_N, (p + 1) *
    BLOCK_N)`` of ``W`` against the ``M <= BLOCK_M <= 4`` tokens over the s-th contiguous K range
    (a whole number of BLOCK_K tiles). With SPLIT_K == 1 it writes ``out`` [M, N] in its dtype;
    otherwise fp32 partial sums to ``out`` [SPLIT_K, M, N], summed by ``_split_k_sum_kernel``.
    ``EVEN_K``: every K tile is full (K % (BLOCK_K * SPLIT_K) == 0), so loads are unmasked.
    ``x_row{1,2,3}``: offsets of x's rows 1-3, clamped to its last row (a padded token row reads
    real memory and is never stored).
    ``SILU_MUL``: x's rows are [gate | up], 2K wide, and the kernel multiplies ``silu(gate) * up``
    (rounded to x's dtype, as engine/kernels/activation.py does) by W.
    ``SLAB``: one tile holds the whole K range (SPLIT_K == 1, BLOCK_K >= K), loaded before the
    PDL wait. With it, ``NORM`` (one token): the row multiplied is ``rms_norm(x)`` with weight
    ``norm_w`` (loaded before the wait too), or with HAS_RESIDUAL ``rms_norm(x + residual)``, that
    sum stored to ``sum_ptr`` by the first program."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if SLAB:
        k_ok = offs_k < K
        w_slab = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            norm_w = tl.load(norm_w_ptr + offs_k, mask=k_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        pdl_prologue(USE_PDL)
        w = w_slab.to(tl.float32)
        if NORM:
            x0 = _normed_x(x_ptr, residual_ptr, sum_ptr, norm_w, offs_k, k_ok, K, eps, pid_n == 0, HAS_RESIDUAL)
        else:
            x0 = _x_tile(x_ptr, offs_k, k_ok, K, SILU_MUL)
        acc0 = w * x0[None, :]
        if BLOCK_M > 1:
            acc1 = w * _x_tile(x_ptr + x_row1, offs_k, k_ok, K, SILU_MUL)[None, :]
        if BLOCK_M > 2:
            acc2 = w * _x_tile(x_ptr + x_row2, offs_k, k_ok, K, SILU_MUL)[None, :]
        if BLOCK_M > 3:
            acc3 = w * _x_tile(x_ptr + x_row3, offs_k, k_ok, K, SILU_MUL)[None, :]
    else:
        pdl_prologue(USE_PDL)
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_len
        k_hi = tl.minimum(k_lo + k_len, K)
        # One accumulator tile per token (unused ones are never touched and compile away).
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_hi
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            else:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc0 += w * _x_tile(x_ptr, k, k_ok, K, SILU_MUL)[None, :]
            if BLOCK_M > 1:
                acc1 += w * _x_tile(x_ptr + x_row1, k, k_ok, K, SILU_MUL)[None, :]
            if BLOCK_M > 2:
                acc2 += w * _x_tile(x_ptr + x_row2, k, k_ok, K, SILU_MUL)[None, :]
            if BLOCK_M > 3:
                acc3 += w * _x_tile(x_ptr + x_row3, k, k_ok, K, SILU_MUL)[None, :]

    if SPLIT_K == 1:
        out_rows = out_ptr
        dtype = out_ptr.dtype.element_ty
    else:
        out_rows = out_ptr + pid_k * M * N
        dtype = tl.float32
    tl.store(out_rows + offs_n, tl.sum(acc0, 1).to(dtype), mask=n_ok)
    if BLOCK_M > 1:
        if M > 1:
            tl.store(out_rows + N + offs_n, tl.sum(acc1, 1).to(dtype), mask=n_ok)
    if BLOCK_M > 2:
        if M > 2:
            tl.store(out_rows + 2 * N + offs_n, tl.sum(acc2, 1).to(dtype), mask=n_ok)
    if BLOCK_M > 3:
        if M > 3:
            tl.store(out_rows + 3 * N + offs_n, tl.sum(acc3, 1).to(dtype), mask=n_ok)


@triton.jit
def _split_k_sum_kernel(part_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    """Grid ``(cdiv(M * N, BLOCK),)``: ``out = sum over s of part[s]``, in out's dtype."""
    pdl_prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_config(n: int, k: int) -> GemvConfig:
    """The tiling for one token, from a sweep on an H200 (bench/bench_gemv.py --sweep,
    bench/results/gemv_h200.json: within 4% of the best of 30-44 tilings on each of the eight
    linear shapes of Qwen3-0.6B and Llama-3.1-8B): few rows per program for narrow outputs, long
    K tiles (8 warps) when that still leaves few programs; never split K (it lost everywhere)."""
    block_n = 4 if n <= 4096 else 8 if n <= 8192 else 16
    programs = triton.cdiv(n, block_n)
    block_k = 1024 if programs <= 512 else 512 if programs <= 1024 else 256
    block_k = min(block_k, triton.next_power_of_2(k))
    return GemvConfig(block_n, block_k, 1, 8 if block_k == 1024 else 4)


def slab_fits(n: int, k: int, config: GemvConfig | None = None) -> bool:
    """Whether a program of ``config`` (default: ``default_config(n, k)``) takes its whole
    [block_n, K] slab as one tile, requested before the PDL wait (the module docstring)."""
    cfg = config or default_config(n, k)
    return cfg.split_k == 1 and cfg.block_n * triton.next_power_of_2(k) <= SLAB_ELEMENTS * 32 * cfg.num_warps


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None, *,
         silu_mul: bool = False, slab: bool | None = None) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` [M, K] with M <= MAX_TOKENS, ``weight`` [N, K] (both with a
    contiguous last dim), in x's dtype. ``silu_mul``: x is [M, 2K] = [gate | up] and the product
    is ``silu_and_mul(x) @ weight.T``, the activation fused into the loads. ``slab``: whether
    programs take their whole slab as one tile (default: ``slab_fits``; True needs split_k 1)."""
    return _gemv(x, weight, config, silu_mul=silu_mul, slab=slab)


def gemv_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gemv(rms_norm(x + residual)), x + residual)`` for one token ``x`` [1, K] (``residual``
    None: ``(gemv(rms_norm(x)), x)``), the add and the norm (weight ``norm_weight`` [K]) done in
    the loads of a one-slab GEMV (``slab_fits``): one launch where there were two. The math and
    roundings are engine/kernels/rms_norm.py's; its fp32 sum of squares adds in another order, so
    the norm's statistic may differ in its last bit. The sum is a new tensor. No host syncs."""
    assert x.shape[0] == 1 and norm_weight.shape == (x.shape[1],) and norm_weight.is_contiguous()
    if residual is None:
        return _gemv(x, weight, config, slab=True, norm=(norm_weight, eps)), x
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    total = torch.empty_like(x)
    return _gemv(x, weight, config, slab=True, norm=(norm_weight, eps), residual=residual, total=total), total


def _gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None, *, silu_mul: bool = False,
          slab: bool | None = None, norm: tuple[torch.Tensor, float] | None = None,
          residual: torch.Tensor | None = None, total: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x.shape
    if silu_mul:
        k //= 2
    n, k_w = weight.shape
    assert 1 <= m <= MAX_TOKENS and k_w == k, f"gemv takes [<= {MAX_TOKENS}, K] x [N, K], got {x.shape}, {weight.shape}"
    assert x.stride(1) == 1 and weight.stride(1) == 1
    cfg = config or default_config(n, k)
    block_m = 1 if m == 1 else 2 if m == 2 else 4
    split_k = cfg.split_k
    if slab is None:
        slab = slab_fits(n, k, cfg)
    assert not slab or split_k == 1, "a one-tile slab takes the whole K range: split_k must be 1"
    assert norm is None or (slab and m == 1 and not silu_mul), "the norm is fused into one token's slab only"
    block_k = triton.next_power_of_2(k) if slab else cfg.block_k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    norm_weight, eps = norm if norm is not None else (x, 0.0)  # not read without a norm
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
        x, weight, target, m, n, k, weight.stride(0), *(min(i, m - 1) * x.stride(0) for i in (1, 2, 3)),
        x if residual is None else residual, norm_weight, x if total is None else total, eps,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=k % (block_k * split_k) == 0, SILU_MUL=silu_mul, SLAB=slab,
        NORM=norm is not None, HAS_RESIDUAL=residual is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device),
    )
    if split_k > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT_K=split_k, BLOCK=block,
                                                          **pdl_args(target.device))
    return out
