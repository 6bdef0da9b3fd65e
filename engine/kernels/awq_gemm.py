"""Triton kernels for AWQ 4-bit linears (AutoAWQ "GEMM" layout, see engine/quantization/awq.py).

On Hopper GPUs, 1-16 tokens of fp16/bf16 go to the tensor-core kernel of awq_mma.py (Gluon; on an
H200 a Llama-3.1-8B layer's linears 1.04x faster than this module's gemv at one token, 1.2x at
two, 1.5-1.8x faster than the fused kernel at 4-16), and the large linears of 128-1024 tokens to
the warp-specialized wgmma kernel of awq_wgmma.py (Gluon; gate_up and down at 256 tokens 1.4-1.8x
faster than dequantize + matmul). The kernels here take the rest, and every shape where those do
not run (other GPUs, fp32, the interpreter): three ways to compute
``y = x @ W`` with ``W = (q - z) * s`` of shape [K, N]:

- ``awq_gemv``: for one or two tokens, a split-K GEMV on the CUDA cores fed by the tensor memory
  accelerator (TMA): the packed weight streams into shared memory a few tiles ahead, each thread
  turns the 8 nibbles of a word into exact floats with one LOP3 each and FFMAs them with the
  tokens; scales and zero points are applied once per K tile.
- ``awq_gemm``: fused. Each program streams its [K, BLOCK_N] slice of the packed weight and its
  activations through TMA, turns a [BLOCK_K, BLOCK_N] tile into the exact 16-bit floats q - z
  (half a LOP3 and half a packed SUB a weight) and feeds it to ``tl.dot``; the scale is applied
  per output and K tile. Up to 32 tokens the weight tile is the MMA's wide side. Split-K spreads
  K over more programs when N alone gives too few to fill the GPU; both kernels sum the splits in
  the kernel.
- ``awq_dequantize`` then a dense ``torch.matmul``: for many tokens. The separate pass writes the
  whole bf16 weight (13-86 us a Llama-3.1-8B linear on an H200, 73-80% of the copy rate), which
  the matmul amortizes only at thousands of tokens (0.5-0.7x bf16 at 256, 0.8-0.9x at 2048).

``awq_linear`` picks between them by token count (``MMA_MAX_TOKENS``, ``wgmma_preferred``, ``GEMV_MAX_TOKENS``,
``FUSED_MAX_TOKENS``, measured on an H200 with bench/bench_awq_linear.py). The two TMA-fed kernels need the packed rows
(N / 2 bytes) to be a multiple of 16 bytes (``tma_supported``: N % 32 == 0, true of the models'
projection widths); other widths take dequantize + matmul at any token count.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from engine.kernels.counters import arrival_counters
from engine.kernels.pdl import pdl_args, pdl_prologue

if TYPE_CHECKING:
    from engine.kernels.decode_attention import DecodeSplits

# The interpreter computes bf16 arithmetic (and tl.dot) on the raw 16-bit patterns: there the
# fused kernel takes bf16 activations through its fp32 path (q - z from fp16, exact).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Above this many tokens dequantize + dense matmul beats the fused kernel: on an H200, summed over a
# Llama-3.1-8B layer's linears, fused 294 us vs 327 at 192 tokens, 423 vs 340 at 256 (344 vs 343
# with each shape's best tiling; bench/results/awq_linear_s14_crossing.json).
FUSED_MAX_TOKENS = 192

# Up to this many tokens the split-K gemv (no tensor cores: one FFMA per weight and token) beats
# the fused kernel. On an H200 for the Llama-3.1-8B shapes (bench/results/awq_linear_s13_final.json):
# at 1 token 7.4-23.9 us against 11.1-48.6, at 2 tokens 9.3-28.1 against 11.1-49.0; at 4 tokens it
# loses (gate_up 63.2 against 49.3 us, awq_linear_s13_magic.json).
GEMV_MAX_TOKENS = 2

# A 4-bit q OR-ed into these exponent bits reads as the float MAGIC + q, exactly: q - z then
# costs one subtraction and no integer-to-float conversion.
_FP16_MAGIC_BITS, _BF16_MAGIC_BITS = 0x6400, 0x4300  # 1024.0 in fp16, 128.0 in bf16
# The same, for the kernels: the interpreter runs no inline PTX.
_IN_INTERPRETER = tl.constexpr(_INTERPRETED)
_BF16_MAGIC, _FP16_MAGIC = tl.constexpr(_BF16_MAGIC_BITS), tl.constexpr(_FP16_MAGIC_BITS)


@triton.jit
def _magic_pairs(words, SHIFT: tl.constexpr, MAGIC_BITS: tl.constexpr):
    """``(word >> SHIFT) & 0x000F000F | MAGIC`` in both halves: nibbles SHIFT / 4 and SHIFT / 4 + 4
    (columns 2j and 2j + 1 of the word in the AWQ order, SHIFT = 4j) as the two 16-bit floats
    MAGIC + q of one 32-bit word, with one LOP3 on a GPU."""
    v = words >> SHIFT if SHIFT > 0 else words
    if _IN_INTERPRETER:
        return (v & 0x000F000F) | (MAGIC_BITS * 0x10001)
    elif MAGIC_BITS == _BF16_MAGIC:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [v],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xEA;", "=r,r", [v],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _pair_columns(pairs, DTYPE: tl.constexpr):
    """int32 [R, W] words of two 16-bit floats -> [R, W, 2] floats (low half first)."""
    if _IN_INTERPRETER:
        lo = (pairs & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    elif DTYPE == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    return tl.join(lo, hi)


@triton.jit
def _sub_pairs(a, b, DTYPE: tl.constexpr):
    """Both halves of ``a - b`` for int32 words of two 16-bit floats each, as such words (one
    packed SUB on a GPU)."""
    if DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise("sub.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("sub.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _column_pairs(words, zero_words, SHIFT: tl.constexpr, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Columns 2j and 2j + 1 (SHIFT = 4j) of each word as [R, W, 2] floats: MAGIC + q, or q - z
    when ``zero_words`` ([1, W], the same columns' packed zero points) is given, exactly."""
    pairs = _magic_pairs(words, SHIFT, MAGIC_BITS)
    if zero_words is None:
        columns = _pair_columns(pairs, DTYPE)
    else:
        zero_pairs = tl.broadcast_to(_magic_pairs(zero_words, SHIFT, MAGIC_BITS), pairs.shape)
        if _IN_INTERPRETER:
            columns = _pair_columns(pairs, DTYPE) - _pair_columns(zero_pairs, DTYPE)
        else:
            columns = _pair_columns(_sub_pairs(pairs, zero_pairs, DTYPE), DTYPE)
    return columns


@triton.jit
def _magic_tile(words, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr, zero_words=None):
    """int32 [R, W] packed words -> [R, 8 W] 16-bit floats in natural column order: MAGIC + q, or
    with ``zero_words`` ([1, W] packed zero points) the exact q - z.

    Nibbles j and j + 4 of a word hold its columns 2j and 2j + 1, so one masked word per j gives
    both as a pair of 16-bit floats (``_magic_pairs``): per weight half a LOP3 and 3/8 of a shift
    (and half a packed SUB for q - z: (MAGIC + q) - (MAGIC + z) is exact), and the pairs are
    already the 32-bit halves of the tile's rows. The joins and permutes only name the registers
    in column order."""
    p0 = _column_pairs(words, zero_words, 0, MAGIC_BITS, DTYPE)
    p1 = _column_pairs(words, zero_words, 4, MAGIC_BITS, DTYPE)
    p2 = _column_pairs(words, zero_words, 8, MAGIC_BITS, DTYPE)
    p3 = _column_pairs(words, zero_words, 12, MAGIC_BITS, DTYPE)
    lo = tl.permute(tl.join(p0, p1), (0, 1, 3, 2))  # [R, W, j in 0..1, column in pair]
    hi = tl.permute(tl.join(p2, p3), (0, 1, 3, 2))  # j in 2..3
    tile = tl.permute(tl.join(lo, hi), (0, 1, 4, 2, 3))  # [R, W, j // 2, j % 2, column in pair]
    return tile.reshape(words.shape[0], words.shape[1] * 8)


@triton.jit
def _store_split_k(out_ptr, partial_ptr, lock_ptr, lock, offs, ok, acc, split, split_k, MN,
                   UNROLL: tl.constexpr):
    """Store a program's ``acc`` at ``out_ptr + offs``: directly when split_k == 1; otherwise as
    fp32 partial ``split`` of ``partial_ptr`` ([split_k, MN]), and the last program of the output
    tile to arrive (counted in ``lock_ptr[lock]``, which it resets to 0) sums the split_k
    partials in order, UNROLL loads in flight, and stores the result: one launch, deterministic.
    ``split_k`` is a runtime value, so both branches are compiled: ``partial_ptr`` must point at
    real memory even without a split."""
    if split_k == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(partial_ptr + split * MN + offs, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + lock, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            total = tl.zeros_like(acc)
            for s0 in range(0, split_k, UNROLL):
                for j in tl.static_range(UNROLL):
                    part = tl.load(partial_ptr + tl.minimum(s0 + j, split_k - 1) * MN + offs, mask=ok, other=0.0,
                                   cache_modifier=".cg")
                    total += tl.where(s0 + j < split_k, part, 0.0)
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(lock_ptr + lock, 0, sem="relaxed", scope="gpu")


@triton.jit
def _awq_gemm_kernel(
    x_desc, w_desc, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, lock_ptr,
    M, N, K, group_size, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr, REDUCE_UNROLL: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; program (p, s) owns the output
    tile p and the K tiles s, s + SPLIT_K, ... Assumes N % 8 == 0, BLOCK_N % 8 == 0, and that
    a K tile never straddles two groups (group_size % BLOCK_K == 0, or one group over all K).

    The packed weight arrives through the tensor memory accelerator (``w_desc``: qweight [K, N / 8]
    in [BLOCK_K, BLOCK_N / 8] tiles, pipelined into shared memory; rows and columns past the edge
    read as 0). The tensor cores take the tile as the exact 16-bit floats q - z (``_magic_tile``:
    per weight half a LOP3 and half a packed SUB), and inside a K tile every column has one scale,
    applied to the tile's fp32 product per output. The activations ([BLOCK_M, BLOCK_K] tiles of
    ``x_desc``, rows past M read as 0) arrive through TMA as well; the zero points and scales of
    the next K tile load one step ahead (the pipeliner leaves these small loads synchronous, an L2
    round trip every step otherwise). fp32 activations meet the weights in fp32 (q - z exact from
    fp16). SWAP_AB computes the transposed product so that the weight tile, BLOCK_N wide, is the
    MMA's M side and the few tokens its N side (faster for up to 32 tokens). With SPLIT_K > 1 the
    programs of an output tile sum their fp32 partials in the kernel (``_store_split_k``; SPLIT_K
    is a runtime value: no recompilation per split)."""
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_ok = offs_w < N // 8
    k_step = BLOCK_K * SPLIT_K

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zero_next, scales_next = _gemm_tile_groups(qzeros_ptr, scales_ptr, pid_k * BLOCK_K, N, group_size, offs_n,
                                               offs_w, n_ok, w_ok)
    for k0 in range(pid_k * BLOCK_K, K, k_step):
        zero_words, scales = zero_next, scales_next
        # The next K tile's (this one's again after the last: in bounds, unused).
        k_ahead = tl.where(k0 + k_step < K, k0 + k_step, k0)
        zero_next, scales_next = _gemm_tile_groups(qzeros_ptr, scales_ptr, k_ahead, N, group_size, offs_n, offs_w,
                                                   n_ok, w_ok)
        x = x_desc.load([pid_m * BLOCK_M, k0]).to(DOT_DTYPE)
        words = w_desc.load([k0, pid_n * (BLOCK_N // 8)])
        w = _magic_tile(words, MAGIC_BITS, MAGIC_DTYPE, zero_words[None, :]).to(DOT_DTYPE)
        if SWAP_AB:
            acc += tl.dot(tl.trans(w), tl.trans(x), input_precision=DOT_PRECISION) * scales[:, None]
        else:
            acc += tl.dot(x, w, input_precision=DOT_PRECISION) * scales[None, :]
    if SWAP_AB:
        acc = tl.trans(acc)

    out_mask = m_ok[:, None] & n_ok[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    _store_split_k(out_ptr, partial_ptr, lock_ptr, pid, out_offs, out_mask, acc, pid_k, SPLIT_K, M * N,
                   REDUCE_UNROLL)


@triton.jit
def _gemm_tile_groups(qzeros_ptr, scales_ptr, k0, N, group_size, offs_n, offs_w, n_ok, w_ok):
    """The packed zero points [BLOCK_N / 8] and scales [BLOCK_N] (fp32) of the K tile at ``k0``."""
    group = k0 // group_size
    zero_words = tl.load(qzeros_ptr + group * (N // 8) + offs_w, mask=w_ok, other=0)
    scales = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    return zero_words, scales


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
    group = (pid_k * BLOCK_K) // group_size

    words = tl.load(qweight_ptr + offs_k[:, None] * n_words + offs_w[None, :],
                    mask=k_ok[:, None] & w_ok[None, :], other=0)
    zero_words = tl.load(qzeros_ptr + group * n_words + offs_w, mask=w_ok, other=0)
    scales = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0)
    q_minus_z = _magic_tile(words, _FP16_MAGIC, tl.float16, zero_words[None, :])
    if out_ptr.dtype.element_ty == tl.float16:
        w = q_minus_z * scales[None, :]
    else:
        w = (q_minus_z.to(tl.float32) * scales[None, :].to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=k_ok[:, None] & n_ok[None, :])


# The gemv's int -> float trick, exact and free of integer-to-float conversions (I2F is quarter
# rate on Hopper): a value v < 2**23 in the low bits of a word reads, as fp32, as the subnormal
# v * 2**-149. The activations are scaled by 2**90 (exact) so that x * q * 16**e * 2**-149 is a
# normal number again; the result is scaled back at the end.
_X_SCALE_LOG2 = 90


@triton.jit(do_not_specialize=["k_per_split", "split_k"])
def _awq_gemv_kernel(
    x_ptr, w_desc, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, lock_ptr,
    M, N, K, n_words, stride_xm, group_shift, k_per_split, split_k,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    X_SCALE_LOG2: tl.constexpr, REDUCE_UNROLL: tl.constexpr = 8, USE_PDL: tl.constexpr = False,
):
    """Split-K dequantizing GEMV for a few tokens: ``out`` [M, N] = x [M, K] @ ((q - z) * s).

    Grid ``(cdiv(N / 8, BLOCK_W), split_k)``. Program (p, s) owns the packed words ``p * BLOCK_W
    ..`` (8 * BLOCK_W output columns, all BLOCK_M >= M tokens) and the K rows ``s * k_per_split
    ..`` (a multiple of BLOCK_K; BLOCK_K divides K and the group size, so a K tile lies in one
    group).

    Loads: the packed weight arrives through the tensor memory accelerator (``w_desc``, a TMA
    descriptor of qweight [K, N / 8]), one [BLOCK_K, BLOCK_W] tile per step, NUM_STAGES - 1 tiles
    ahead, into shared memory: the bytes in flight no longer cost registers or threads, which is
    what held the register-fed loads of a one-token GEMV to about half the copy rate. Activations,
    zero points and scales are small and come through the caches.

    Tiling: the products are [BLOCK_M, 8, BLOCK_K, BLOCK_W] with the words last, so each thread
    keeps the tokens, the 8 columns of a word and its K rows in registers and the words lie across
    the lanes: the sum over K of x * q is in-thread FFMAs, with a few shuffles when BLOCK_W is under
    32 lanes. Per weight: one LOP3 (shift-free for 5 of 8 nibbles) and one FFMA per token; the
    loop's sm_90 SASS (16 x 64 tiles) has 3.2 and 4.9 instructions per weight at 1 and 2 tokens
    (8.1 at 4, where the fused kernel is faster).

    Exactness: nibble planes ``(word >> shift) & mask`` read as the fp32 subnormal q * 16**e *
    2**-149 (positions 0-4 masked in place, e = position; 5-7 from ``word >> 16``, e = position -
    4), exactly. Each K tile's raw sum is scaled by s once, and the zero point comes out of the K
    sum per tile: raw = sum x * q - z * sum x, which can cancel (its error grows like (q + z) /
    |q - z| against the exact form); valid while |x| < 2**30 (a tile's sum of x * 2**90 stays
    finite); terms with |x| < ~1e-20 lose precision (subnormal products). The powers of two are
    undone at the end.

    With split_k > 1 the programs of column block p sum their fp32 partials in the kernel
    (``_store_split_k``, counter ``lock_ptr[p]``): one launch, deterministic."""
    pdl_prologue(USE_PDL)
    pid_w = tl.program_id(0)
    pid_s = tl.program_id(1)
    w0 = pid_w * BLOCK_W
    m = tl.arange(0, BLOCK_M)[:, None, None]  # [BLOCK_M, 1, 1]
    c = tl.arange(0, 8)[None, :, None]  # [1, 8, 1]
    w = w0 + tl.arange(0, BLOCK_W)[None, None, :]  # [1, 1, BLOCK_W]
    # Column 8j + c sits in nibble position c // 2 + 4 * (c % 2) (AWQ order 0, 2, 4, 6, 1, 3, 5, 7).
    pos = c // 2 + 4 * (c % 2)
    top = pos >= 5
    shift = tl.where(top, 16, 0)
    mask = tl.where(top, 0xF << (4 * (pos - 4)), 0xF << (4 * pos))
    # 16**-e * 2**149 / 2**X_SCALE_LOG2, built from its exponent bits (exact, unlike exp2).
    unscale = tl.where(top, -4 * (pos - 4), -4 * pos) + 149 - X_SCALE_LOG2
    unscale = ((unscale + 127) << 23).to(tl.float32, bitcast=True)
    w_ok = w < n_words
    w_in = tl.minimum(w, n_words - 1)  # clamped: columns past N compute garbage that is not stored
    # Rows past M read row M - 1 (real memory) and are never stored.
    x_rows = x_ptr + tl.minimum(m, M - 1) * stride_xm + tl.arange(0, BLOCK_K)[None, None, :]  # [BLOCK_M, 1, BLOCK_K]
    # The 8 scales of a word, contiguous, as one load per thread: [1, BLOCK_W, 8], permuted on use.
    scale_offs = tl.permute(w_in * 8 + c, (0, 2, 1))

    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, 8, BLOCK_W), dtype=tl.float32)
    # The activations of the next K tile load one step ahead (clamped to the last tile: in bounds,
    # unused): the pipeliner leaves this small load synchronous, and waiting out its L2 round trip
    # every step stalled the GEMV's one or two warps a scheduler (ncu: long scoreboard first).
    x_next = tl.load(x_rows + k_lo)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        words = w_desc.load([k0, w0])  # [BLOCK_K, BLOCK_W]
        x_tile = x_next
        x_next = tl.load(x_rows + tl.minimum(k0 + BLOCK_K, K - BLOCK_K))
        x = (x_tile.to(tl.float32) * (2.0**X_SCALE_LOG2))[:, :, :, None]  # [BLOCK_M, 1, BLOCK_K, 1]
        planes = ((words[None, None, :, :] >> shift[:, :, :, None]) & mask[:, :, :, None]).to(tl.float32,
                                                                                            bitcast=True)
        raw = tl.sum(x * planes, axis=2)  # [BLOCK_M, 8, BLOCK_W]
        group = k0 >> group_shift
        zero_planes = ((tl.load(qzeros_ptr + group * n_words + w_in) >> shift) & mask).to(tl.float32, bitcast=True)
        scales = tl.permute(tl.load(scales_ptr + group * N + scale_offs).to(tl.float32), (0, 2, 1))
        acc += (raw - tl.sum(x, axis=2) * zero_planes) * scales
    # [BLOCK_M, BLOCK_W, 8]: a thread's 8 columns are contiguous in out.
    out = tl.permute(acc * unscale, (0, 2, 1))
    offs = tl.permute(m * N + w * 8 + c, (0, 2, 1))
    ok = tl.permute((m < M) & w_ok & (c < 8), (0, 2, 1))
    _store_split_k(out_ptr, partial_ptr, lock_ptr, pid_w, offs, ok, out, pid_s, split_k, M * N, REDUCE_UNROLL)


def tma_supported(n: int) -> bool:
    """Whether the gemv and the fused kernel take an output width of ``n``: the TMA descriptor's
    row stride (n / 2 bytes) must be a multiple of 16 bytes."""
    return n % 32 == 0


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
    swap_ab: bool | None = None  # None: for up to 32 tokens


def gemm_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> GemmConfig:
    """The fused kernel's tiling, from sweeps on an H200 (bench/bench_awq_linear.py --sweep 4 16
    64, bench/results/awq_linear_tma_s12.json; --sweep 32, awq_linear_s13_fused32.json). Up to 32
    tokens: 16- or 32-token, 64-column tiles with the weight as the MMA's wide side (swap_ab) and
    split-K until there are about 3.5 programs per SM (at 32 tokens the sweep's best on all four
    Llama-3.1-8B shapes). Above: 64-token tiles, 64 columns (128 when that alone gives a program
    per SM) and split-K to about 1.5 programs per SM; 4 stages for outputs of at most 64 column
    tiles up to 128 tokens (o and down at 48-128 tokens: 15-25% faster than 3,
    bench/results/awq_linear_s14_tilings.json). K tiles lie inside one group."""
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    if group_size < k:
        block_k = min(block_k, group_size)
    k_tiles = triton.cdiv(k, block_k)
    if m <= 32:
        block_m, block_n, programs = max(16, triton.next_power_of_2(m)), 64, 7 * num_sms // 2
    else:
        block_m = 64
        block_n = 128 if triton.cdiv(n, 128) >= num_sms else 64
        programs = 3 * num_sms // 2
    block_n = max(32, min(block_n, triton.next_power_of_2(n)))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while tiles * split_k < programs and split_k * 2 <= min(16, k_tiles):
        split_k *= 2
    stages = 4 if 32 < m <= 128 and triton.cdiv(n, block_n) <= 64 else 3
    return GemmConfig(block_m, block_n, block_k, split_k, num_stages=stages, swap_ab=m <= 32)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are plenty


def _tma_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] when TMA can read it (16-byte aligned start and row stride), else a copy whose
    rows are padded to 16 bytes (the descriptor still ends at column K)."""
    align = 16 // x.element_size()
    if x.data_ptr() % 16 == 0 and x.stride(0) % align == 0:
        return x
    padded = torch.empty((x.shape[0], triton.cdiv(x.shape[1], align) * align), dtype=x.dtype, device=x.device)
    padded[:, : x.shape[1]] = x
    return padded[:, : x.shape[1]]


def awq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Fused dequantize-GEMM: ``x`` [M, K] (fp16, bf16 or fp32) times the AWQ weight -> [M, N] in
    x's dtype. ``config`` overrides ``gemm_config``. Needs ``tma_supported(N)``."""
    m, k_x = x.shape
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    assert k_x == k, f"x has {k_x} features, the weight {k}"
    assert x.stride(1) == 1
    assert tma_supported(n), f"awq_gemm needs N % 32 == 0, got {n}"
    cfg = GemmConfig(*config) if config else gemm_config(m, n, k, group_size, _num_sms(x.device))
    block_m, block_n, block_k, split_k = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    assert group_size % block_k == 0 or group_size == k, "a K tile must lie inside one group"
    assert block_n >= 32 and block_k <= 256, "a TMA box is at least 16 bytes wide and at most 256 rows"
    swap_ab = m <= 32 if cfg.swap_ab is None else cfg.swap_ab
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    # Partial sums a thread loads at once in the split-K reduction: about 32 registers' worth.
    per_thread = max(1, block_m * block_n // (32 * cfg.num_warps))
    x_desc = TensorDescriptor.from_tensor(_tma_rows(x), [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(qweight, [block_k, block_n // 8])
    _awq_gemm_kernel[grid](
        x_desc, w_desc, qzeros, scales, out, partial, arrival_counters(x.device, grid[0] if split_k > 1 else 0),
        m, n, k, group_size, split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWAP_AB=swap_ab,
        REDUCE_UNROLL=max(1, min(8, 32 // per_thread)), **_dot_types(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device),
    )
    return out


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The dense weight [K, N] ``(q - z) * s`` in ``dtype`` (default: the scales' dtype)."""
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    out = torch.empty((k, n), dtype=dtype or scales.dtype, device=qweight.device)
    # 32 divides every group size. 256 columns a program: on an H200 (session 30, Llama-3.1-8B shapes) qkv
    # 30.3 -> 20.7 us, down 48.1 -> 44.0, gate_up 87.5 -> 84.9 against 128 (3.0-3.5 TB/s read + written).
    block_k, block_n = 32, min(256, triton.next_power_of_2(n))
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _awq_dequantize_kernel[grid](qweight, qzeros, scales, out, n, k, group_size,
                                 BLOCK_K=block_k, BLOCK_N=block_n, **pdl_args(qweight.device))
    return out


class GemvConfig(NamedTuple):
    block_w: int  # packed words per program (8 output columns each)
    block_k: int  # K rows per tile: a power of two <= 256 dividing K and the group size
    split_k: int  # programs along K
    num_stages: int = 3  # weight tiles in flight: num_stages - 1 ahead of the one being summed


def gemv_config(n: int, k: int, group_size: int, num_sms: int, tokens: int = 1) -> GemvConfig:
    """The gemv's tiling, from sweeps on an H200 (bench/bench_awq_linear.py --gemv-sweep, 24-48
    tilings a shape, Llama-3.1-8B shapes; bench/results/awq_linear_gemv_tma_h200.json and, for
    this rule, awq_linear_gemv_tma_rule_h200.json): 16 words (one warp) per program, 64-row K
    tiles, 3 stages, and split-K up to about eight programs per SM, four for weights of up to 32M
    entries: once the activations no longer stalled every K tile, fewer splits won there (o 7.44
    -> 6.71 us with 16 splits instead of 33, qkv 8.45 -> 8.18 with 11 instead of 22; gate_up and
    down within 5% of their best at 8; awq_linear_s13_gemv_sweep.json). Two tokens double the
    FFMAs per weight: there a program also takes at most 7
    K tiles (gate_up: 10 splits, 30.5 us against 43.1 with the one-token rule's 5; the other
    shapes keep theirs, within 1.5 us of their best; bench/results/awq_linear_s13_gemv2.json,
    awq_linear_s13.json)."""
    block_w = min(16, triton.next_power_of_2(n // 8))
    block_k = 64
    while block_k > 1 and (k % block_k or group_size % block_k):
        block_k //= 2
    programs = triton.cdiv(n // 8, block_w)
    # Small weights: about 4 programs per SM, big ones 8 (their split-K tails weigh less).
    per_sm = 4 if n * k <= 32 * 2**20 else 8
    split_k = max(1, min(k // block_k, round(per_sm * num_sms / programs)))
    if tokens > 1:
        split_k = max(split_k, triton.cdiv(k // block_k, 7))
    return GemvConfig(block_w, block_k, split_k)


# Partial sums of one token the gemv's split-K reduction loads before it adds them (at most the
# split): it waits out one L2 round trip per batch of loads (ptxas keeps ~18 of 32 in flight at
# 96 registers). 8 -> 32 took the o projection from 8.0 to 7.7 us on an H200 (33 splits).
_GEMV_REDUCE_LOADS = 32

def awq_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Dequantizing split-K GEMV for up to ``GEMV_MAX_TOKENS`` tokens (see _awq_gemv_kernel): ``x``
    [M, K] (fp16, bf16 or fp32) times the AWQ weight -> [M, N] in x's dtype. ``config`` overrides
    ``gemv_config``. Needs ``tma_supported(N)`` and a power-of-two group size (or one group over
    all of K)."""
    m, k_x = x.shape
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    assert 1 <= m <= GEMV_MAX_TOKENS, f"awq_gemv takes 1 to {GEMV_MAX_TOKENS} tokens, got {m}"
    assert k_x == k, f"x has {k_x} features, the weight {k}"
    assert x.stride(1) == 1
    assert tma_supported(n), f"awq_gemv needs N % 32 == 0, got {n}"
    assert group_size == k or group_size & (group_size - 1) == 0, "groups: a power of two or all of K"
    cfg = GemvConfig(*config) if config else gemv_config(n, k, group_size, _num_sms(x.device), m)
    n_words = n // 8
    block_w, block_k = cfg.block_w, cfg.block_k
    assert k % block_k == 0 and group_size % block_k == 0 and block_k <= 256, \
        "a K tile must divide K, lie inside one group and be at most 256 rows"
    # Whole K tiles per split; splits left without a tile are dropped.
    k_per_split = triton.cdiv(k // block_k, cfg.split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    group_shift = group_size.bit_length() - 1 if group_size < k else 31
    grid = (triton.cdiv(n_words, block_w), split_k)
    block_m = triton.next_power_of_2(m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # split_k is a runtime argument, so the reduction is compiled even when unused: it needs the
    # int32 counters whatever the split.
    locks = arrival_counters(x.device, grid[0])
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    _awq_gemv_kernel[grid](
        x, TensorDescriptor.from_tensor(qweight, [block_k, block_w]), qzeros, scales, out, partial, locks,
        m, n, k, n_words, x.stride(0), group_shift, k_per_split, split_k,
        BLOCK_M=block_m, BLOCK_W=block_w, BLOCK_K=block_k, NUM_STAGES=cfg.num_stages,
        X_SCALE_LOG2=_X_SCALE_LOG2,
        REDUCE_UNROLL=min(triton.next_power_of_2(split_k), max(1, _GEMV_REDUCE_LOADS // block_m)),
        num_warps=max(1, block_w // 32), num_stages=cfg.num_stages,
        **pdl_args(x.device),
    )
    return out


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W (+ bias)`` for x [..., K]: the tensor-core kernel of awq_mma.py for up to
    ``MMA_MAX_TOKENS`` where it runs; on Hopper the wgmma kernel of awq_wgmma.py for the token
    counts and weight sizes where it is the fastest (``wgmma_preferred``); else the gemv for one or
    two tokens, the fused kernel for up to ``FUSED_MAX_TOKENS``, dequantize + dense matmul above,
    and for output widths the TMA kernels do not take (``tma_supported``)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    tokens, tma = x2.shape[0], tma_supported(qweight.shape[1] * 8)
    group_size = qweight.shape[0] // scales.shape[0]
    if tokens <= _awq_mma.MMA_MAX_TOKENS and _awq_mma.mma_supported(x2, qweight, group_size):
        out = _awq_mma.awq_mma(x2, qweight, qzeros, scales)
    elif (_awq_wgmma.wgmma_preferred(tokens, qweight.shape[1] * 8, qweight.shape[0], _num_sms(x.device))
          and _awq_wgmma.wgmma_supported(x2, qweight, group_size)):
        out = _awq_wgmma.awq_wgmma(x2, qweight, qzeros, scales)
    elif tma and tokens <= GEMV_MAX_TOKENS:
        out = awq_gemv(x2, qweight, qzeros, scales)
    elif tma and tokens <= FUSED_MAX_TOKENS:
        out = awq_gemm(x2, qweight, qzeros, scales)
    else:
        out = torch.matmul(x2, awq_dequantize(qweight, qzeros, scales, dtype=x.dtype))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def awq_linear_partials(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                        ) -> torch.Tensor | None:
    """Where ``awq_linear`` of a 2-D ``x`` runs the tensor-core kernel: that kernel's split-K
    partial sums of ``x @ W``, fp32 [split_k, M, N], for a next kernel to add up in split order
    (``awq_mma(..., return_partials=True)``); else None."""
    if (x.dim() == 2 and x.stride(1) == 1 and 0 < x.shape[0] <= _awq_mma.MMA_MAX_TOKENS
            and _awq_mma.mma_supported(x, qweight, qweight.shape[0] // scales.shape[0])):
        return _awq_mma.awq_mma(x, qweight, qzeros, scales, return_partials=True)
    return None


def awq_linear_decode_splits(splits: DecodeSplits, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                             ) -> torch.Tensor | None:
    """``awq_linear`` of decode attention's output ``[T, H * D]`` given as its splits' partials,
    where the tensor-core kernel runs it and can combine them as it loads its activations (one
    request: ``awq_mma(..., splits=...)``, ``splits_fit``); else None (combine, then ``awq_linear``)."""
    x = splits.out.view(splits.out.shape[0], -1)
    if _awq_mma.mma_supported(x, qweight, qweight.shape[0] // scales.shape[0]) and _awq_mma.splits_fit(qweight, splits):
        return _awq_mma.awq_mma(x, qweight, qzeros, scales, splits=splits)
    return None


# At the end: the Gluon kernels take their helpers from this module (the imports resolve either way round).
from engine.kernels import awq_mma as _awq_mma  # noqa: E402
from engine.kernels import awq_wgmma as _awq_wgmma  # noqa: E402
