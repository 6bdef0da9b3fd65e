"""The ids of a step's placeholder tokens (asynchronous scheduling: tokens whose id the step
before samples), written into its device inputs from where that step's sampler left them, so
the host never waits for them. One launch, inside the step's CUDA graph when one serves it
(engine/input_buffers.py has the layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue


# The token count changes with every eager step: it must not pick a compiled variant.
@triton.jit(do_not_specialize=["num_tokens"])
def _resolve_kernel(ids_ptr, src_ptr, sampled_ptr, num_tokens, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Grid ``(cdiv(num_tokens, BLOCK),)``: ``ids[t] = sampled[src[t]]`` where ``src[t] >= 0``."""
    pdl_prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_ptr + offs, mask=offs < num_tokens, other=-1)
    take = src >= 0
    tl.store(ids_ptr + offs, tl.load(sampled_ptr + src, mask=take), mask=take)


def resolve_placeholders(input_ids: torch.Tensor, placeholder_src: torch.Tensor, sampled_ids: torch.Tensor) -> None:
    """``input_ids[t] = sampled_ids[placeholder_src[t]]`` for every token with ``placeholder_src[t]
    >= 0``, in place (int64 tensors of one device). No host syncs."""
    assert input_ids.shape == placeholder_src.shape and input_ids.dim() == 1
    num_tokens = input_ids.shape[0]
    if num_tokens == 0:
        return
    block = min(1024, triton.next_power_of_2(num_tokens))
    _resolve_kernel[(triton.cdiv(num_tokens, block),)](input_ids, placeholder_src, sampled_ids, num_tokens,
                                                       BLOCK=block, num_warps=1 if block <= 128 else 4,
                                                       **pdl_args(input_ids.device))
