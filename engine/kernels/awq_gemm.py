"""Triton kernels for AWQ 4-bit linears (AutoAWQ "GEMM" layout, see engine/quantization/awq.py).

Two ways to compute ``y = x @ W`` with ``W = (q - z) * s`` of shape [K, N]:

- ``awq_gemm``: fused. Each program streams its [K, BLOCK_N] slice of the packed weight once,
  dequantizes a [BLOCK_K, BLOCK_N] tile in registers and feeds it to ``tl.dot``. For few tokens
  this is bound by reading the 4-bit weight, about a quarter of the bytes of a bf16 matmul.
  Split-K spreads K over more programs when N alone gives too few to fill the GPU.
- ``awq_dequantize`` then a dense ``torch.matmul``: for many tokens the matmul is compute-bound
  and the one-off dequantization is cheap next to it.

``awq_linear`` picks between them by token count (``FUSED_MAX_TOKENS``, measured on an H200 with
bench/bench_awq_linear.py).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The interpreter computes bf16 arithmetic (and tl.dot) on the raw 16-bit patterns: there the
# kernels take q - z in fp16 and multiply in fp32, which is exact too.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Above this many tokens dequantize + dense matmul beats the fused kernel: on an H200, summed over a
# Llama-3.1-8B layer's linears, fused 202 us vs 282 at 64 tokens, 349 vs 337 at 128, 574 vs 341 at
# 256 (bench/results/awq_linear.json).
FUSED_MAX_TOKENS = 64

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
    DOT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; program (p, s) owns the output
    tile p and the K tiles s, s + SPLIT_K, ... Assumes N % 8 == 0, BLOCK_N % 8 == 0, and that
    a K tile never straddles two groups (group_size % BLOCK_K == 0, or one group over all K).

    Inside a K tile every column has one scale, so the tile's product is ``x @ (q - z)`` (exact
    small integers, in DOT_DTYPE) times ``s`` per column, in fp32: no per-weight multiply.
    With SPLIT_K > 1 it writes fp32 partial sums to ``out_ptr[s]`` ([SPLIT_K, M, N]), else the
    result in x's dtype (SPLIT_K is a runtime value: no recompilation per split)."""
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
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``; each program writes one [BLOCK_K, BLOCK_N]
    tile of the dense weight ``(q - z) * s`` in the output's dtype, rounded once. Assumes N % 8
    == 0, BLOCK_N % 8 == 0 and that a K tile lies inside one group."""
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
                                 BLOCK_K=block_k, BLOCK_N=block_n)
    return out


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W (+ bias)`` for x [..., K]: the fused kernel for up to ``FUSED_MAX_TOKENS`` tokens,
    dequantize + dense matmul above."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= FUSED_MAX_TOKENS:
        out = awq_gemm(x2, qweight, qzeros, scales)
    else:
        out = torch.matmul(x2, awq_dequantize(qweight, qzeros, scales, dtype=x.dtype))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])
