"""The gated MLP activation ``silu(gate) * up`` in one launch, computed in float32 and rounded
once to the input dtype (the layer's torch code, engine/layers/activation.py, rounds silu(gate)
first). One launch replaces the layer's 2 torch kernels and their intermediate tensor."""

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
