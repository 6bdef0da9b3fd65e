"""Gated activation of the fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.partials import SplitKPartials


class SiluAndMul(nn.Module):
    """``[..., 2 * d] -> [..., d]``: silu(gate) * up, where the input is cat(gate, up). On CUDA one
    Triton kernel (engine/kernels/activation.py), which also takes the input as a gate/up
    projection's split-K partials and adds them as it loads them."""

    def forward(self, x: torch.Tensor | SplitKPartials) -> torch.Tensor:
        if isinstance(x, SplitKPartials):
            from engine.kernels.activation import silu_and_mul_partials

            return silu_and_mul_partials(x.partials, x.dtype)
        if x.is_cuda:
            from engine.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
