"""RMSNorm, alone or fused with the residual add before it, in one launch.

Rounding matches the layer's torch code (engine/layers/norm.py): normalize in float32, round to
the input dtype, then multiply by the weight (cast to the input dtype) and round again. The
residual sum ``x + residual`` is rounded to the input dtype before it is normalized.

One launch replaces the layer's 8 torch kernels in bf16 (9 with the residual add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    num_heads, dim, eps,
    stride_x_tok, stride_x_head, stride_r_tok, stride_out_tok, stride_out_head,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_tokens,)``: one program normalizes every row of one token, as one
    ``[BLOCK_H, BLOCK_D]`` tile (rows = heads, 1 for a hidden-state norm; both padded to powers of
    two and masked). Assumes the last dim is contiguous; token and head strides are free.
    With HAS_RESIDUAL (one row per token) it first forms ``x + residual`` in x's dtype and writes
    it back over ``residual``. The weight, never written, is read before the PDL wait: after a
    layer's weight stream it is likely a DRAM miss, where x, just written, is likely in L2."""
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < dim)
    weight = tl.load(weight_ptr + dims, mask=dims < dim, other=0.0)
    pdl_prologue(USE_PDL)
    x = tl.load(x_ptr + tok * stride_x_tok + heads * stride_x_head + dims, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + tok * stride_r_tok + dims  # BLOCK_H == 1: broadcasts like x
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(residual_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / dim + eps)
    normed = (xf * rstd[:, None]).to(dtype)
    out = normed.to(tl.float32) * weight.to(dtype).to(tl.float32)
    tl.store(out_ptr + tok * stride_out_tok + heads * stride_out_head + dims, out.to(dtype), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, num_warps: int | None
) -> torch.Tensor:
    assert x.dim() in (2, 3) and x.stride(-1) == 1, "x must be [T, D] or [T, H, D] with a contiguous last dim"
    dim = x.shape[-1]
    assert weight.shape == (dim,) and weight.is_contiguous()
    rows = x if x.dim() == 3 else x[:, None, :]
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    num_tokens, num_heads, _ = rows.shape
    if num_tokens == 0:
        return out.view(x.shape)
    block_h, block_d = triton.next_power_of_2(num_heads), triton.next_power_of_2(dim)
    if num_warps is None:
        num_warps = min(max(block_h * block_d // 256, 1), 16)  # about 8 elements per thread
    _rms_norm_kernel[(num_tokens,)](
        rows, residual if residual is not None else rows, weight, out,
        num_heads, dim, eps,
        rows.stride(0), rows.stride(1), residual.stride(0) if residual is not None else 0,
        out.stride(0), out.stride(1),
        HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps,
        **pdl_args(rows.device),
    )
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``: ``[T, D]`` (any row stride) or ``[T, H, D]`` (any token
    and head strides, e.g. q or k split from a fused qkv output, for per-head q/k norm); the last
    dim must be contiguous. ``weight [D]``. Returns a new contiguous tensor in x's dtype. No host
    syncs."""
    return _launch(x, None, weight, eps, num_warps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = x + residual`` (rounded to x's dtype), written in place into ``residual``;
    returns ``(rms_norm(residual_out), residual)``. ``x`` and ``residual`` ``[T, D]``, same dtype,
    any row strides, contiguous last dim. No host syncs."""
    assert x.dim() == 2 and residual.shape == x.shape and residual.dtype == x.dtype
    assert residual.stride(-1) == 1, "residual's last dim must be contiguous"
    return _launch(x, residual, weight, eps, num_warps), residual
