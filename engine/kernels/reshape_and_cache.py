"""Write this step's new keys and values into the paged KV cache through the slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_kv_heads, head_dim,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_tokens,)``: one program copies every kv head of one token, as one
    ``[BLOCK_H, BLOCK_D]`` tile (heads and head_dim padded to powers of two and masked).
    Assumes the last dim of every tensor is contiguous; a negative slot is padding and is skipped."""
    pdl_prologue(USE_PDL)
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    k = tl.load(key_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask)
    kc = key_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
    tl.store(kc + heads * stride_kc_head + dims, k.to(key_cache_ptr.dtype.element_ty), mask=mask)

    v = tl.load(value_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    vc = value_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
    tl.store(vc + heads * stride_vc_head + dims, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_warps: int = 4,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping``
    ``[num_tokens]`` (slot = block_id * block_size + offset; slot < 0: padding, skipped) of the
    caches ``[num_blocks, block_size, num_kv_heads, head_dim]``. No host syncs."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = key_cache.shape[1]
    assert value.shape == key.shape and value_cache.shape == key_cache.shape
    assert key_cache.shape[2:] == (num_kv_heads, head_dim)
    assert slot_mapping.shape == (num_tokens,)
    for t in (key, value, key_cache, value_cache):
        assert t.stride(-1) == 1, "the last dim must be contiguous"
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        num_kv_heads, head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=num_warps,
        **pdl_args(key.device),
    )
