"""The gated MLP activation ``silu(gate) * up`` in one launch, computed in float32 and rounded
once to the input dtype (the layer's torch code, engine/layers/activation.py, rounds silu(gate)
first). One launch replaces the layer's 2 torch kernels and their intermediate tensor.

``silu_and_mul_partials`` takes the gate/up projection's split-K partial sums instead of its
output (``awq_mma(..., return_partials=True)``): it adds them in split order as it loads them, so
the projection ends without summing them itself, and gives the same bits as the projection's own
sum followed by ``silu_and_mul``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x_tok, stride_out_tok, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    """Grid ``(num_tokens, cdiv(d, BLOCK))``: program (t, j) reads columns ``[j * BLOCK,
    (j + 1) * BLOCK)`` of token t's gate (``x[t, :d]``) and up (``x[t, d:]``) halves. Assumes the
    last dim is contiguous."""
    pdl_prologue(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate_ptrs = x_ptr + tok * stride_x_tok + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0)
    up = tl.load(gate_ptrs + d, mask=mask, other=0.0)
    dtype = gate.dtype
    gate, up = gate.to(tl.float32), up.to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + tok * stride_out_tok + cols, out.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_partials_kernel(p_ptr, out_ptr, d, num_tokens, stride_out_tok, SPLIT_K: tl.constexpr,
                                  BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Grid ``(num_tokens, cdiv(d, BLOCK))``: gate and up of program (t, j)'s columns are the sums,
    from zero in split order, of the fp32 partials ``p[s, t, :d]`` and ``p[s, t, d:]`` (``p``
    [SPLIT_K, num_tokens, 2 d], contiguous; every load issued before the adds), each rounded to
    the output dtype, then ``_silu_and_mul_kernel``'s arithmetic."""
    pdl_prologue(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        row = p_ptr + (s * num_tokens + tok) * 2 * d + cols
        gate += tl.load(row, mask=mask, other=0.0)
        up += tl.load(row + d, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    gate, up = gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + tok * stride_out_tok + cols, out.to(dtype), mask=mask)


def silu_and_mul_partials(partials: torch.Tensor, dtype: torch.dtype, *, block: int = 512,
                          num_warps: int = 4) -> torch.Tensor:
    """``partials`` fp32 [S, T, 2 d] (the split-K partial sums of a gate/up projection's output) ->
    ``silu_and_mul`` of their sum in ``dtype``, [T, d]: the bits of summing them in split order,
    rounding to ``dtype`` and calling ``silu_and_mul``. No host syncs."""
    assert partials.dim() == 3 and partials.dtype == torch.float32 and partials.is_contiguous()
    assert partials.shape[-1] % 2 == 0, "the partials' last dim must be 2 * d"
    split_k, tokens, d = partials.shape[0], partials.shape[1], partials.shape[2] // 2
    out = torch.empty(tokens, d, dtype=dtype, device=partials.device)
    if tokens == 0:
        return out
    block = min(block, triton.next_power_of_2(d))
    _silu_and_mul_partials_kernel[(tokens, triton.cdiv(d, block))](
        partials, out, d, tokens, out.stride(0), SPLIT_K=split_k, BLOCK=block, num_warps=num_warps,
        **pdl_args(partials.device),
    )
    return out


def silu_and_mul(x: torch.Tensor, *, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """``x [..., 2 * d]`` = cat(gate, up) -> ``silu(gate) * up [..., d]``, a new contiguous
    tensor in x's dtype. The leading dims must flatten to one (any row stride); the last dim must
    be contiguous. No host syncs."""
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1, "x must be [..., 2 * d] with a contiguous last dim"
    d = x.shape[-1] // 2
    rows = x.view(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.view(*x.shape[:-1], d)
    block = min(block, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out, d, rows.stride(0), out.stride(0), BLOCK=block, num_warps=num_warps,
        **pdl_args(rows.device),
    )
    return out.view(*x.shape[:-1], d)
