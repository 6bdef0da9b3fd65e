"""Triton kernels for AWQ 4-bit linears (AutoAWQ "GEMM" layout, see engine/quantization/awq.py).

Three ways to compute ``y = x @ W`` with ``W = (q - z) * s`` of shape [K, N]:

- ``awq_gemv``: for a few tokens, a split-K GEMV on the CUDA cores. It never builds a dequantized
  tile: each thread takes one packed word of a row, turns its 8 nibbles into exact floats with one
  LOP3 each (above 4 tokens plus one FADD, which also subtracts the zero point) and FFMAs them
  with every token; scales and zero points are applied once per K tile. About 3.1 instructions
  per weight at 1 token, 7.3 at 4 and 13.4 at 8 (sm_90 SASS): best at 1 token, fading by ~8.
- ``awq_gemm``: fused. Each program streams its [K, BLOCK_N] slice of the packed weight once,
  dequantizes a [BLOCK_K, BLOCK_N] tile in registers and feeds it to ``tl.dot``. For few tokens
  this is bound by reading the 4-bit weight, about a quarter of the bytes of a bf16 matmul.
  Split-K spreads K over more programs when N alone gives too few to fill the GPU.
- ``awq_dequantize`` then a dense ``torch.matmul``: for many tokens the matmul is compute-bound
  and the one-off dequantization is cheap next to it.

``awq_linear`` picks between them by token count (``GEMV_MAX_TOKENS``, ``FUSED_MAX_TOKENS``,
measured on an H200 with bench/bench_awq_linear.py).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue

# The interpreter computes bf16 arithmetic (and tl.dot) on the raw 16-bit patterns: there the
# kernels take q - z in fp16 and multiply in fp32, which is exact too.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Above this many tokens dequantize + dense matmul beats the fused kernel: on an H200, summed over a
# Llama-3.1-8B layer's linears, fused 202 us vs 282 at 64 tokens, 349 vs 337 at 128, 574 vs 341 at
# 256 (bench/results/awq_linear.json).
FUSED_MAX_TOKENS = 64

# Up to this many tokens the split-K gemv (no tensor cores: one FFMA per weight and token) beats
# the fused kernel: on an H200 (bench/results/awq_linear.json, Llama-3.1-8B shapes, best tilings)
# at 1 token 1.5-1.9x faster than bf16 where awq_gemm is 0.85-1.05x; at 4 tokens the two are even
# (a layer's four linears: 143 vs 136 us) and at 8 awq_gemm is 1.6x faster.
GEMV_MAX_TOKENS = 1

# A 4-bit q OR-ed into these exponent bits reads as the float MAGIC + q, exactly: q - z then
# costs one subtraction and no integer-to-float conversion.
_FP16_MAGIC_BITS, _BF16_MAGIC_BITS = 0x6400, 0x4300  # 1024.0 in fp16, 128.0 in bf16


@triton.jit
def _column_shifts(offs_n):
    # AWQ order 0,2,4,6,1,3,5,7: column 8j + c sits in nibble c // 2 + 4 * (c % 2).
    return ((offs_n % 8) // 2) * 4 + (offs_n % 2) * 16


@triton.jit
def _nibbles_as_float(words, shifts, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr):
    """int32 [R, C/8] packed words -> [R, C] floats MAGIC + q in natural column order.

    Three interleaves repeat every word 8 times side by side; ``shifts`` [C] then picks, for
    column c, the nibble the AWQ order put it in."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    bits = ((words >> shifts[None, :]) & 0xF) | MAGIC_BITS
    return bits.to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; program (p, s) owns the output
    tile p and the K tiles s, s + SPLIT_K, ... Assumes N % 8 == 0, BLOCK_N % 8 == 0, and that
    a K tile never straddles two groups (group_size % BLOCK_K == 0, or one group over all K).

    Inside a K tile every column has one scale, so the tile's product is ``x @ (q - z)`` (exact
    small integers, in DOT_DTYPE) times ``s`` per column, in fp32: no per-weight multiply.
    With SPLIT_K > 1 it writes fp32 partial sums to ``out_ptr[s]`` ([SPLIT_K, M, N]), else the
    result in x's dtype (SPLIT_K is a runtime value: no recompilation per split)."""
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_ok = offs_w < N // 8
    shifts = _column_shifts(offs_n)
    n_words = N // 8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        words = tl.load(qweight_ptr + k[:, None] * n_words + offs_w[None, :],
                        mask=k_ok[:, None] & w_ok[None, :], other=0)
        group = k0 // group_size
        zero_words = tl.load(qzeros_ptr + group * n_words + offs_w, mask=w_ok, other=0)
        scales = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        q = _nibbles_as_float(words, shifts, MAGIC_BITS, MAGIC_DTYPE)
        z = _nibbles_as_float(zero_words[None, :], shifts, MAGIC_BITS, MAGIC_DTYPE)
        w = (q - z).to(DOT_DTYPE)
        acc += tl.dot(x.to(DOT_DTYPE), w, input_precision=DOT_PRECISION) * scales[None, :]

    out_mask = m_ok[:, None] & n_ok[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)


@triton.jit
def _awq_dequantize_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    N, K, group_size,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``; each program writes one [BLOCK_K, BLOCK_N]
    tile of the dense weight ``(q - z) * s`` in the output's dtype, rounded once. Assumes N % 8
    == 0, BLOCK_N % 8 == 0 and that a K tile lies inside one group."""
    pdl_prologue(USE_PDL)
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    k_ok = offs_k < K
    n_ok = offs_n < N
    w_ok = offs_w < N // 8
    n_words = N // 8
    shifts = _column_shifts(offs_n)
    group = (pid_k * BLOCK_K) // group_size

    words = tl.load(qweight_ptr + offs_k[:, None] * n_words + offs_w[None, :],
                    mask=k_ok[:, None] & w_ok[None, :], other=0)
    zero_words = tl.load(qzeros_ptr + group * n_words + offs_w, mask=w_ok, other=0)
    scales = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0)
    q = _nibbles_as_float(words, shifts, 0x6400, tl.float16)
    z = _nibbles_as_float(zero_words[None, :], shifts, 0x6400, tl.float16)
    if out_ptr.dtype.element_ty == tl.float16:
        w = (q - z) * scales[None, :]
    else:
        w = ((q - z).to(tl.float32) * scales[None, :].to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=k_ok[:, None] & n_ok[None, :])


# The gemv's int -> float tricks, both exact and free of integer-to-float conversions (I2F is
# quarter rate on Hopper). A value v < 2**23 in the low bits of a word reads, as fp32, as the
# subnormal v * 2**-149; OR-ed into the bits of 2**23 it reads as 2**23 + v. The latter is passed as
# a kernel argument (not a constant) so that ptxas keeps it in a register and fuses the nibble's
# AND and this OR into one LOP3.
_FP32_MAGIC_BITS = 0x4B000000  # 8388608.0 = 2**23
# With subnormal nibbles the activations are scaled by 2**90 (exact) so that x * q * 16**e * 2**-149
# is a normal number again; the result is scaled back at the end.
_X_SCALE_LOG2 = 90


@triton.jit
def _nibble_planes(words, shift, mask, magic, EXACT_ZERO: tl.constexpr):
    """int32 words [..., 1] -> fp32 [..., 8], the 8 columns of each word in natural order (column
    8j + c is the last index c): 2**23 + q * 16**e if EXACT_ZERO, else q * 16**e * 2**-149, exactly.
    ``shift`` / ``mask`` [..., 8] are per-column constants: nibble positions 0..4 are masked in
    place (e = position), 5..7 from ``words >> 16`` (e = position - 4), so that q * 16**e <= 15 *
    2**16 fits the mantissa and the sign bits of the arithmetic shift are masked off. One LOP3 per
    nibble, plus one shift per word."""
    bits = (words >> shift) & mask
    if EXACT_ZERO:
        bits = bits | magic
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_rows(raw, x, row_ptrs, row_stride, zero_planes, shift, mask, magic, ROWS: tl.constexpr,
               EXACT_ZERO: tl.constexpr):
    """``raw`` [BM, KL, BW, 8] += sum over ROWS rows of x * q' where q' = (q - z) * 16**e if
    EXACT_ZERO (the one FADD that removes the 2**23 of both planes also subtracts z, exactly:
    Sterbenz) else q * 16**e * 2**-149 (no FADD at all).

    ``x`` [BM, KL, ROWS] holds the activations of rows ``row_ptrs + r * row_stride`` (r < ROWS) in
    registers. Tensors cannot be indexed, so the rows are peeled off by halving the last dim
    (reshape + split of an in-register dim: no data movement) down to one row per leaf; each leaf
    is one coalesced load of a packed row [1, KL, BW, 1] and an FFMA per weight and token, so a
    dequantized weight lives only as long as its row."""
    if ROWS == 1:
        planes = _nibble_planes(tl.load(row_ptrs), shift, mask, magic, EXACT_ZERO)
        if EXACT_ZERO:
            planes -= zero_planes
        raw += tl.reshape(x, (x.shape[0], x.shape[1]))[:, :, None, None] * planes
    else:
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], ROWS // 2, 2)))
        raw = _gemv_rows(raw, x_even, row_ptrs, 2 * row_stride, zero_planes, shift, mask, magic, ROWS // 2,
                         EXACT_ZERO)
        raw = _gemv_rows(raw, x_odd, row_ptrs + row_stride, 2 * row_stride, zero_planes, shift, mask, magic,
                         ROWS // 2, EXACT_ZERO)
    return raw


# n_words unspecialized: its divisibility unknown, no load is vectorized and a thread holds one word
# per packed row, the layout of the scales and the accumulator (no conversion between them); the
# split sizes unspecialized: one compiled kernel per tiling whatever the split.
@triton.jit(do_not_specialize=["n_words", "k_per_split", "split_k"])
def _awq_gemv_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, lock_ptr,
    M, N, K, n_words, stride_xm, group_shift, k_per_split, split_k, magic,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, K_LANES: tl.constexpr,
    REDUCE: tl.constexpr, EXACT_ZERO: tl.constexpr, X_SCALE_LOG2: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Split-K dequantizing GEMV for a few tokens: ``out`` [M, N] = x [M, K] @ ((q - z) * s).

    Grid ``(cdiv(N / 8, BLOCK_W), split_k)``. Program (p, s) owns the packed words
    ``p * BLOCK_W ..`` (8 * BLOCK_W output columns, all BLOCK_M >= M tokens) and the K rows
    ``s * k_per_split ..`` (a multiple of BLOCK_K; BLOCK_K divides K and the group size).

    Tiling: the threads lie along the words of a packed row (one word each, coalesced 4-byte
    loads), K_LANES = max(1, 32 * num_warps / BLOCK_W) of them along K; each thread walks its rows
    of a BLOCK_K tile one at a time (``_gemv_rows``) and keeps the 8 columns of its word as an
    in-register last dim: nothing is ever shuffled (no interleave, no tl.dot). The accumulator is
    [BLOCK_M, K_LANES, BLOCK_W, 8] (8 * BLOCK_M fp32 per thread, plus as many for the tile's raw
    sums), summed over K_LANES once at the end. Per weight: one LOP3, one FFMA per token, and one
    FADD if EXACT_ZERO. The activation tile goes through shared memory once per K tile, to be in
    every thread's registers. NUM_STAGES > 1 has Triton pipeline the loads (cp.async into shared
    memory, NUM_STAGES - 1 tiles ahead): more loads in flight for ~0.5 more instructions per weight.

    Exactness: the nibble planes are exact (``_nibble_planes``). Each K tile lies in one group, so
    its raw sum is scaled by s once per tile, and the powers of two (16**e, the 2**X_SCALE_LOG2 of
    x, 2**-149) once at the end. EXACT_ZERO: the raw sum is an fp32 sum of x * (q - z) * 16**e
    (exact products), rounded as awq_gemm's. Otherwise the zero point comes out of the K sum, per
    tile: raw = sum x * q - z * sum x, which can cancel (its error grows like (q + z) / |q - z|
    against the exact form); valid while |x| < 2**30 (a tile's sum of x * 2**90 stays finite),
    terms with |x| < ~1e-20 lose precision (subnormal products).

    REDUCE: 0 -> split_k == 1, store ``out`` in its dtype; 1 -> store fp32 partials to
    ``partial_ptr[s]`` ([split_k, M, N]) for a separate sum; 2 -> ``tl.atomic_add`` into the fp32
    ``out_ptr`` (zeroed by the caller); 3 -> store the partial, then the last program of column
    block p to arrive (counted in ``lock_ptr[p]``, which it resets to 0) sums the split_k partials
    in order and stores ``out``: one launch, deterministic."""
    pdl_prologue(USE_PDL)
    pid_w = tl.program_id(0)
    pid_s = tl.program_id(1)
    ROWS: tl.constexpr = BLOCK_K // K_LANES

    m = tl.arange(0, BLOCK_M)[:, None, None, None]
    lane_k = tl.arange(0, K_LANES)[None, :, None, None]
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :, None]
    c = tl.arange(0, 8)[None, None, None, :]
    # Column 8j + c sits in nibble position c // 2 + 4 * (c % 2) (AWQ order 0, 2, 4, 6, 1, 3, 5, 7).
    pos = c // 2 + 4 * (c % 2)
    top = pos >= 5
    shift = tl.where(top, 16, 0)
    mask = tl.where(top, 0xF << (4 * (pos - 4)), 0xF << (4 * pos))
    # 16**-e, and for subnormal planes 2**149 / 2**X_SCALE_LOG2, built from its exponent bits (exact,
    # unlike exp2's approximation).
    unscale = tl.where(top, -4 * (pos - 4), -4 * pos)
    if not EXACT_ZERO:
        unscale += 149 - X_SCALE_LOG2
    unscale = ((unscale + 127) << 23).to(tl.float32, bitcast=True)
    m_ok = m < M
    w_ok = w < n_words
    w_in = tl.minimum(w, n_words - 1)  # clamped: columns past N compute garbage that is not stored

    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # x tile [BLOCK_M, BLOCK_K] as [BLOCK_M, K_LANES, ROWS]: row k0 + r * K_LANES + lane.
    xm = tl.arange(0, BLOCK_M)[:, None, None]
    x_offs = xm * stride_xm + tl.arange(0, ROWS)[None, None, :] * K_LANES + tl.arange(0, K_LANES)[None, :, None]
    x_ok = xm < M
    row_ptrs = qweight_ptr + (k_lo + lane_k) * n_words + w_in  # [1, K_LANES, BLOCK_W, 1]
    row_stride = K_LANES * n_words

    acc = tl.zeros((BLOCK_M, K_LANES, BLOCK_W, 8), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        group = k0 >> group_shift
        zero_planes = _nibble_planes(tl.load(qzeros_ptr + group * n_words + w_in), shift, mask, magic, EXACT_ZERO)
        scales = tl.load(scales_ptr + group * N + w_in * 8 + c).to(tl.float32)
        x = tl.load(x_ptr + k0 + x_offs, mask=x_ok, other=0.0).to(tl.float32)
        if not EXACT_ZERO:
            x = x * (2.0**X_SCALE_LOG2)
        raw = tl.zeros((BLOCK_M, K_LANES, BLOCK_W, 8), dtype=tl.float32)
        raw = _gemv_rows(raw, x, row_ptrs, row_stride, zero_planes, shift, mask, magic, ROWS, EXACT_ZERO)
        if not EXACT_ZERO:
            raw -= tl.sum(x, axis=2)[:, :, None, None] * zero_planes
        acc += raw * scales
        row_ptrs += BLOCK_K * n_words
    out = tl.sum(acc, axis=1, keep_dims=True) * unscale  # [BLOCK_M, 1, BLOCK_W, 8]

    offs = m * N + w * 8 + c
    ok = m_ok & w_ok
    if REDUCE == 0:
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)
    elif REDUCE == 1:
        tl.store(partial_ptr + pid_s * M * N + offs, out, mask=ok)
    elif REDUCE == 2:
        tl.atomic_add(out_ptr + offs, out, mask=ok, sem="relaxed")
    else:
        tl.store(partial_ptr + pid_s * M * N + offs, out, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + pid_w, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            # UNROLL independent loads in flight (about 128 registers), then their sums in order.
            UNROLL: tl.constexpr = max(2, 16 // BLOCK_M)
            total = tl.zeros((BLOCK_M, 1, BLOCK_W, 8), dtype=tl.float32)
            for s0 in range(0, split_k, UNROLL):
                for j in tl.static_range(UNROLL):
                    part = tl.load(partial_ptr + tl.minimum(s0 + j, split_k - 1) * M * N + offs, mask=ok, other=0.0,
                                   cache_modifier=".cg")
                    total += tl.where(s0 + j < split_k, part, 0.0)
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(lock_ptr + pid_w, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, numel, split_k, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Grid ``(cdiv(numel, BLOCK),)``: ``out`` = sum over s of ``partial[s]`` (fp32, in order), in
    out's dtype."""
    pdl_prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        total += tl.load(partial_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def _check_shapes(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, int]:
    k, n_words = qweight.shape
    n = n_words * 8
    groups = scales.shape[0]
    assert scales.shape == (groups, n) and qzeros.shape == (groups, n_words), "AWQ tensor shapes disagree"
    assert k % groups == 0, "K must be a multiple of the group size"
    assert qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()
    return k, n, k // groups


def _dot_types(dtype: torch.dtype) -> dict[str, object]:
    """The fused kernel's float types for activations of ``dtype``: q - z is formed in the
    activations' 16-bit type (fp16 for fp32 activations, and for bf16 in the interpreter)."""
    if dtype == torch.bfloat16 and not _INTERPRETED:
        return dict(MAGIC_BITS=_BF16_MAGIC_BITS, MAGIC_DTYPE=tl.bfloat16, DOT_DTYPE=tl.bfloat16,
                    DOT_PRECISION="tf32")
    if dtype == torch.float16:
        return dict(MAGIC_BITS=_FP16_MAGIC_BITS, MAGIC_DTYPE=tl.float16, DOT_DTYPE=tl.float16,
                    DOT_PRECISION="tf32")
    # fp32 must not be rounded to tf32 on the tensor cores.
    return dict(MAGIC_BITS=_FP16_MAGIC_BITS, MAGIC_DTYPE=tl.float16, DOT_DTYPE=tl.float32,
                DOT_PRECISION="ieee")


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def gemm_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> GemmConfig:
    """The fused kernel's tiling (from sweeps on an H200, bench/bench_awq_linear.py --sweep): wide
    N tiles for few tokens, and split-K until there are about four programs per SM. K tiles lie
    inside one group."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = max(16, min(256 if m <= 16 else 128, triton.next_power_of_2(n)))
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    if group_size < k:
        block_k = min(block_k, group_size)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split_k = 1
    while tiles * split_k < num_sms * 4 and split_k * 2 <= min(16, k_tiles):
        split_k *= 2
    return GemmConfig(block_m, block_n, block_k, split_k)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are plenty


def awq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Fused dequantize-GEMM: ``x`` [M, K] (fp16, bf16 or fp32) times the AWQ weight -> [M, N] in
    x's dtype. ``config`` overrides ``gemm_config``."""
    m, k_x = x.shape
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    assert k_x == k, f"x has {k_x} features, the weight {k}"
    assert x.stride(1) == 1
    cfg = GemmConfig(*config) if config else gemm_config(m, n, k, group_size, _num_sms(x.device))
    block_m, block_n, block_k, split_k = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    assert group_size % block_k == 0 or group_size == k, "a K tile must lie inside one group"
    if split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _awq_gemm_kernel[grid](
        x, qweight, qzeros, scales, out, m, n, k, group_size, x.stride(0), split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_dot_types(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device),
    )
    return out if split_k == 1 else out.sum(dim=0).to(x.dtype)


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The dense weight [K, N] ``(q - z) * s`` in ``dtype`` (default: the scales' dtype)."""
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    out = torch.empty((k, n), dtype=dtype or scales.dtype, device=qweight.device)
    block_k, block_n = 32, min(128, triton.next_power_of_2(n))  # 32 divides every group size
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _awq_dequantize_kernel[grid](qweight, qzeros, scales, out, n, k, group_size,
                                 BLOCK_K=block_k, BLOCK_N=block_n, **pdl_args(qweight.device))
    return out


class GemvConfig(NamedTuple):
    block_w: int  # packed words per program (8 output columns each)
    block_k: int  # K rows per tile: a power of two dividing K and the group size
    split_k: int  # programs along K
    num_warps: int = 1
    num_stages: int = 1  # > 1: loads pipelined through shared memory, num_stages - 1 tiles ahead


def gemv_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> GemvConfig:
    """The gemv's tiling. One token (measured, bench/results/awq_linear.json: within 7% of the best
    of 28-48 tilings on each Llama-3.1-8B shape): 16 words (128 columns) and 2 warps per program,
    64-row K tiles, pipelined loads, and split-K up to about 1024 programs. More tokens (a first
    guess from the sm_90 SASS; awq_linear sends them to awq_gemm): 32 words per program, per
    thread 16 rows a K tile for up to four tokens and 8 above, one warp, split-K to ~6 warps per
    SM."""
    n_words = n // 8
    if m == 1:
        block_w, num_warps, rows, num_stages = min(16, triton.next_power_of_2(n_words)), 2, 16, 2
    else:
        block_w, num_warps, rows, num_stages = min(32, triton.next_power_of_2(n_words)), 1, 16 if m <= 4 else 8, 1
    k_lanes = max(1, 32 * num_warps // block_w)
    block_k = _gemv_block_k(rows * k_lanes, k, group_size)
    if block_k % k_lanes:  # K or the groups too short for the K lanes
        num_warps, block_w, k_lanes = 1, 32, 1
        block_k = _gemv_block_k(rows, k, group_size)
    programs = triton.cdiv(n_words, block_w)
    k_tiles = k // block_k
    split_k = 1
    if m == 1:
        while programs * split_k * 2 <= 1024 and split_k * 2 <= min(32, k_tiles):
            split_k *= 2
    else:
        while programs * split_k * num_warps < num_sms * 6 and split_k * 2 <= min(32, k_tiles):
            split_k *= 2
    return GemvConfig(block_w, block_k, split_k, num_warps, num_stages)


def _gemv_block_k(block_k: int, k: int, group_size: int) -> int:
    """The largest power of two <= block_k that divides K and the group size."""
    while block_k > 1 and (k % block_k or group_size % block_k):
        block_k //= 2
    return block_k


_GEMV_LOCKS: dict[torch.device, torch.Tensor] = {}
_GEMV_LOCK_SLOTS = 1 << 14


def _gemv_locks(device: torch.device, slots: int) -> torch.Tensor:
    """Per-device arrival counters of the serial split-K reduction, zero between launches (the
    last program of each column block resets its own). Kernels that use them must not run
    concurrently on one device (sluice runs its forward passes on one stream)."""
    assert slots <= _GEMV_LOCK_SLOTS, f"{slots} column blocks: more than the {_GEMV_LOCK_SLOTS} counters"
    locks = _GEMV_LOCKS.get(device)
    if locks is None:
        locks = _GEMV_LOCKS[device] = torch.zeros(_GEMV_LOCK_SLOTS, dtype=torch.int32, device=device)
    return locks


# How awq_gemv combines split-K partial sums: "serial" (default: each program stores its fp32
# partial and the last to arrive per column block sums them, one launch), "partials" (fp32
# partials then _sum_partials_kernel, two launches) or "atomic" (tl.atomic_add into a zeroed fp32
# buffer, then a cast: three launches, and the order of the additions varies).
GEMV_REDUCE = "serial"
_GEMV_REDUCE_MODES = {"partials": 1, "atomic": 2, "serial": 3}
# The gemv's zero point, unless the caller says: up to this many tokens it comes out of the K sum
# per tile (subnormal nibbles: no FADD per weight, but a per-tile correction that grows with the
# tokens and the K tile); above, every weight subtracts it exactly (2**23-biased nibbles), as
# awq_gemm does. From the SASS on sm_90: 3.1 vs 4.0 instructions per weight at 1 token, 4.5 vs 5.4
# at 2, 7.3 vs 7.8 at 4, 14.1 vs 13.4 at 8.
GEMV_FACTORED_ZERO_MAX_TOKENS = 4


def awq_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    config: GemvConfig | None = None,
    reduce: str | None = None,
    exact_zero: bool | None = None,
) -> torch.Tensor:
    """Dequantizing split-K GEMV for a few tokens (at most 16, best at 1; see _awq_gemv_kernel):
    ``x`` [M, K] (fp16, bf16 or fp32) times the AWQ weight -> [M, N] in x's dtype. ``config``
    overrides ``gemv_config``, ``reduce`` ``GEMV_REDUCE``; ``exact_zero`` picks the zero point's
    handling (default: exact above ``GEMV_FACTORED_ZERO_MAX_TOKENS`` tokens)."""
    m, k_x = x.shape
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    assert k_x == k, f"x has {k_x} features, the weight {k}"
    assert x.stride(1) == 1
    assert group_size == k or group_size & (group_size - 1) == 0, "groups: a power of two or all of K"
    if m == 0:
        return x.new_empty((0, n))
    cfg = GemvConfig(*config) if config else gemv_config(m, n, k, group_size, _num_sms(x.device))
    n_words = n // 8
    block_w, block_k = cfg.block_w, cfg.block_k
    assert k % block_k == 0 and group_size % block_k == 0, "a K tile must divide K and lie inside one group"
    k_lanes = max(1, 32 * cfg.num_warps // block_w)
    assert block_k % k_lanes == 0, f"block_k {block_k} < the {k_lanes} lanes along K"
    block_m = triton.next_power_of_2(m)
    assert block_m <= 16, "awq_gemv is for a few tokens"
    # Whole K tiles per split; splits left without a tile are dropped.
    k_per_split = triton.cdiv(k // block_k, cfg.split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    group_shift = group_size.bit_length() - 1 if group_size < k else 31
    mode = 0 if split_k == 1 else _GEMV_REDUCE_MODES[reduce or GEMV_REDUCE]
    grid = (triton.cdiv(n_words, block_w), split_k)
    if mode == 2:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = locks = out  # placeholders where unused
    if mode in (1, 3):
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    if mode == 3:
        locks = _gemv_locks(x.device, grid[0])
    _awq_gemv_kernel[grid](
        x, qweight, qzeros, scales, out, partial, locks,
        m, n, k, n_words, x.stride(0), group_shift, k_per_split, split_k, _FP32_MAGIC_BITS,
        BLOCK_M=block_m, BLOCK_W=block_w, BLOCK_K=block_k, K_LANES=k_lanes, REDUCE=mode,
        EXACT_ZERO=m > GEMV_FACTORED_ZERO_MAX_TOKENS if exact_zero is None else exact_zero,
        X_SCALE_LOG2=_X_SCALE_LOG2, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device),
    )
    if mode == 1:
        block = 1024
        _sum_partials_kernel[(triton.cdiv(m * n, block),)](partial, out, m * n, split_k, BLOCK=block,
                                                           **pdl_args(partial.device))
    elif mode == 2:
        out = out.to(x.dtype)
    return out


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W (+ bias)`` for x [..., K]: the gemv for up to ``GEMV_MAX_TOKENS`` tokens, the fused
    kernel for up to ``FUSED_MAX_TOKENS``, dequantize + dense matmul above."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= GEMV_MAX_TOKENS:
        out = awq_gemv(x2, qweight, qzeros, scales)
    elif x2.shape[0] <= FUSED_MAX_TOKENS:
        out = awq_gemm(x2, qweight, qzeros, scales)
    else:
        out = torch.matmul(x2, awq_dequantize(qweight, qzeros, scales, dtype=x.dtype))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])
