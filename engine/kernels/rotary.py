"""Rotary position embedding, neox style (rotate_half), applied in place to q and k in one launch.

Each output element is ``x1 * cos - x2 * sin`` (first half) or ``x2 * cos + x1 * sin`` (second
half), computed in float32 from the float32 cos/sin caches and rounded once to q's dtype. The
layer's torch code (engine/layers/rotary.py) rounds cos/sin and each product to q's dtype first,
so in 16-bit dtypes the two differ by rounding; in float32 they agree to the last bits.

One launch replaces the layer's 16 torch kernels in bf16 (gathering and widening cos/sin, then
multiplies, negations, concatenations and adds for q and for k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _norm_weight(norm_ptr, half_dim, dims, dtype: tl.constexpr):
    # A per-head RMSNorm weight's halves, rounded to the model dtype as the norm uses them.
    w1 = tl.load(norm_ptr + dims, mask=dims < half_dim, other=0.0).to(dtype).to(tl.float32)
    w2 = tl.load(norm_ptr + half_dim + dims, mask=dims < half_dim, other=0.0).to(dtype).to(tl.float32)
    return w1, w2


@triton.jit
def _norm_rotate(x1, x2, cos, sin, w1, w2, eps, half_dim, NORM: tl.constexpr, dtype: tl.constexpr):
    # Heads' halves x1, x2 (fp32 [heads, BLOCK_HALF] holding values of dtype, zero where masked)
    # rotated and rounded to dtype, with NORM after a per-head RMSNorm with the roundings of
    # engine/kernels/rms_norm.py (normalize in fp32, round, times the weight halves w1, w2 from
    # _norm_weight, round).
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half_dim) + eps)[:, None]
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _norm_rotate_heads(base_ptr, num_heads, stride_head, half_dim, cos, sin, dims, w1, w2, eps,
                       NORM: tl.constexpr, BLOCK_H: tl.constexpr):
    # Rotates the heads of one token in place (their first halves at dims, second halves half_dim
    # on), with NORM after a per-head RMSNorm (_norm_rotate); returns the rotated halves.
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < num_heads) & (dims < half_dim)
    first_ptrs = base_ptr + heads * stride_head + dims
    x1 = tl.load(first_ptrs, mask=mask, other=0.0)
    x2 = tl.load(first_ptrs + half_dim, mask=mask, other=0.0)
    r1, r2 = _norm_rotate(x1.to(tl.float32), x2.to(tl.float32), cos, sin, w1, w2, eps, half_dim, NORM, x1.dtype)
    tl.store(first_ptrs, r1, mask=mask)
    tl.store(first_ptrs + half_dim, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_kv_heads, half_dim,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache_pos,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_tokens,)``: one program reads its token's cos/sin row once and rotates all of
    its q heads as one ``[BLOCK_HQ, BLOCK_HALF]`` tile, then all k heads as ``[BLOCK_HK,
    BLOCK_HALF]`` (heads and half the head dim padded to powers of two and masked). Assumes the
    last dim of q and k is contiguous and that every position is below the caches' length."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)  # before the PDL wait, as _rope_and_cache_kernel
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cache_pos + dims, mask=dims < half_dim, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache_pos + dims, mask=dims < half_dim, other=0.0)
    pdl_prologue(USE_PDL)
    _norm_rotate_heads(q_ptr + tok * stride_q_tok, num_q_heads, stride_q_head, half_dim, cos, sin, dims,
                       cos, cos, 0.0, False, BLOCK_HQ)
    _norm_rotate_heads(k_ptr + tok * stride_k_tok, num_kv_heads, stride_k_head, half_dim, cos, sin, dims,
                       cos, cos, 0.0, False, BLOCK_HK)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    *,
    num_warps: int = 4,
) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]``. q and k may be
    non-contiguous views (e.g. split from a fused qkv output) with a contiguous last dim.
    ``cos_cache``/``sin_cache`` ``[max_position, D // 2]`` float32. No host syncs."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and k.dtype == q.dtype
    assert positions.shape == (num_tokens,)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "the last dim of q and k must be contiguous"
    half_dim = head_dim // 2
    assert cos_cache.shape[1] == half_dim and sin_cache.shape == cos_cache.shape
    assert cos_cache.dtype == sin_cache.dtype == torch.float32
    assert cos_cache.stride(1) == 1 and sin_cache.stride() == cos_cache.stride()
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_cache, sin_cache,
        num_q_heads, num_kv_heads, half_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half_dim),
        num_warps=num_warps,
        **pdl_args(positions.device),
    )


@triton.jit
def _store_kv(key_cache_ptr, value_cache_ptr, slot, heads, dims, mask, half_dim, k1, k2, v1, v2,
              stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
              BLOCK_SIZE: tl.constexpr):
    # A token's rotated k halves and its v halves, of the kv heads at ``heads``, into the paged
    # caches at ``slot`` (< 0: padding, nothing written).
    if slot >= 0:
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        kc = key_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + heads * stride_kc_head + dims
        tl.store(kc, k1.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + half_dim, k2.to(key_cache_ptr.dtype.element_ty), mask=mask)
        vc = value_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + heads * stride_vc_head + dims
        tl.store(vc, v1.to(value_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + half_dim, v2.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_and_cache_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
    key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_q_heads, num_kv_heads, half_dim, eps,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cache_pos, stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_tokens,)``: one program per token does what the per-head q/k RMSNorm (with
    NORM), rotary and cache-write kernels do for it, in one launch: q and k normalized and rotated
    in place as ``[BLOCK_HQ | BLOCK_HK, BLOCK_HALF]`` tiles of half heads, then k's rotated halves
    and v written at the token's slot (slot < 0: padding, nothing written to the cache). Same
    roundings as those kernels: without NORM bit-identical to running them in turn; with it the
    sum of squares adds the two halves' sums, so rstd may differ in its last fp32 bit."""
    # Before the PDL wait: the token's position and slot (this step's host-to-device copies), its
    # cos/sin rows and the norm weights; q, k and v, which the kernel ahead writes, after it.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cache_pos + dims, mask=dims < half_dim, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache_pos + dims, mask=dims < half_dim, other=0.0)
    qw1, qw2 = cos, cos
    kw1, kw2 = cos, cos
    if NORM:
        qw1, qw2 = _norm_weight(q_norm_ptr, half_dim, dims, q_ptr.dtype.element_ty)
        kw1, kw2 = _norm_weight(k_norm_ptr, half_dim, dims, q_ptr.dtype.element_ty)

    pdl_prologue(USE_PDL)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    mask = (heads < num_kv_heads) & (dims < half_dim)
    v = v_ptr + tok * stride_v_tok + heads * stride_v_head + dims
    v1, v2 = tl.load(v, mask=mask), tl.load(v + half_dim, mask=mask)
    _norm_rotate_heads(q_ptr + tok * stride_q_tok, num_q_heads, stride_q_head, half_dim, cos, sin, dims,
                       qw1, qw2, eps, NORM, BLOCK_HQ)
    k1, k2 = _norm_rotate_heads(k_ptr + tok * stride_k_tok, num_kv_heads, stride_k_head, half_dim, cos, sin,
                                dims, kw1, kw2, eps, NORM, BLOCK_HK)
    _store_kv(key_cache_ptr, value_cache_ptr, slot, heads, dims, mask, half_dim, k1, k2, v1, v2,
              stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
              BLOCK_SIZE)


def rope_and_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    num_warps: int = 4,
) -> None:
    """One launch for a layer's q/k preparation: (per-head RMSNorm of q and k with the given
    weights, Qwen3's q/k norm,) rotary on q and k in place, and k and v stored in the paged caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at ``slot_mapping`` (< 0: skipped).
    The same as ``rms_norm`` on q and k, ``rotary_embedding``, then ``reshape_and_cache`` (bit
    for bit without the norm; with it, to the last bit of the fp32 norm statistic). q, k, v
    ``[T, H | Hkv, D]`` with a contiguous last dim (views of a fused qkv output are fine). No host
    syncs."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim) and k.dtype == q.dtype == v.dtype
    assert positions.shape == slot_mapping.shape == (num_tokens,)
    assert key_cache.shape[2:] == (num_kv_heads, head_dim) and value_cache.shape == key_cache.shape
    assert (q_norm_weight is None) == (k_norm_weight is None)
    for t in (q, k, v, key_cache, value_cache):
        assert t.stride(-1) == 1, "the last dim must be contiguous"
    half_dim = head_dim // 2
    assert cos_cache.shape[1] == half_dim and sin_cache.stride() == cos_cache.stride()
    if num_tokens == 0:
        return
    norm = q_norm_weight is not None
    _rope_and_cache_kernel[(num_tokens,)](
        positions, q, k, v, cos_cache, sin_cache,
        q_norm_weight if norm else cos_cache, k_norm_weight if norm else cos_cache,
        key_cache, value_cache, slot_mapping,
        num_q_heads, num_kv_heads, half_dim, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_cache.stride(0), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NORM=norm, BLOCK_SIZE=key_cache.shape[1],
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half_dim), num_warps=num_warps,
        # One token (a one-request decode step): decode attention is placed before this kernel
        # waits, so that its loads before the wait overlap the qkv projection (pdl.py).
        **pdl_args(positions.device, trigger_first=num_tokens == 1),
    )


@triton.jit
def _sum_partials(ptr, stride_split, dims, mask, dtype: tl.constexpr, SPLIT_K: tl.constexpr):
    # The sum from zero in split order of SPLIT_K fp32 partials at ptr + s * stride_split + dims
    # (awq_mma's own sum), rounded to dtype, in fp32.
    acc = tl.zeros(dims.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ptr + s * stride_split + dims, mask=mask, other=0.0)
    return acc.to(dtype).to(tl.float32)


@triton.jit
def _rope_and_cache_partials_kernel(
    positions_ptr, p_ptr, q_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
    key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_tokens, num_q_heads, num_kv_heads, half_dim, eps,
    stride_q_tok, stride_q_head, stride_cache_pos, stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    SPLIT_K: tl.constexpr, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_tokens, num_q_heads + num_kv_heads)``: program (t, h) does
    ``_rope_and_cache_kernel``'s work for token t's q head h (h < num_q_heads; written to q) or kv
    head h - num_q_heads (k and v written at the token's slot), taking q, k and v as the sums of
    a q/k/v projection's fp32 split-K partials ``p [SPLIT_K, num_tokens, (Hq + 2 Hkv) * D]``,
    from zero in split order (every load issued before the adds), each rounded to q's dtype: the
    bits of that projection's own sum followed by ``_rope_and_cache_kernel``. A head's halves are
    ``[1, BLOCK_HALF]`` tiles."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = dims < half_dim
    cos = tl.load(cos_ptr + pos * stride_cache_pos + dims, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache_pos + dims, mask=mask, other=0.0)
    dtype = q_ptr.dtype.element_ty
    is_q = head < num_q_heads
    w1, w2 = cos, cos
    if NORM:
        if is_q:
            w1, w2 = _norm_weight(q_norm_ptr, half_dim, dims, dtype)
        else:
            w1, w2 = _norm_weight(k_norm_ptr, half_dim, dims, dtype)

    pdl_prologue(USE_PDL)
    width = (num_q_heads + 2 * num_kv_heads) * 2 * half_dim
    stride_split = num_tokens * width
    col = p_ptr + tok * width + head * 2 * half_dim  # q head h, or k head h - num_q_heads
    x1 = _sum_partials(col, stride_split, dims, mask, dtype, SPLIT_K)
    x2 = _sum_partials(col + half_dim, stride_split, dims, mask, dtype, SPLIT_K)
    if is_q:
        r1, r2 = _norm_rotate(x1, x2, cos, sin, w1, w2, eps, half_dim, NORM, dtype)
        q = q_ptr + tok * stride_q_tok + head * stride_q_head + dims
        tl.store(q, r1, mask=mask)
        tl.store(q + half_dim, r2, mask=mask)
    else:
        v_col = col + num_kv_heads * 2 * half_dim
        v1 = _sum_partials(v_col, stride_split, dims, mask, dtype, SPLIT_K)
        v2 = _sum_partials(v_col + half_dim, stride_split, dims, mask, dtype, SPLIT_K)
        k1, k2 = _norm_rotate(x1, x2, cos, sin, w1, w2, eps, half_dim, NORM, dtype)
        _store_kv(key_cache_ptr, value_cache_ptr, slot, head - num_q_heads, dims, mask, half_dim, k1, k2, v1, v2,
                  stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
                  BLOCK_SIZE)


def rope_and_cache_partials(
    positions: torch.Tensor,
    partials: torch.Tensor,
    dtype: torch.dtype,
    num_q_heads: int,
    num_kv_heads: int,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    num_warps: int = 2,
) -> torch.Tensor:
    """``rope_and_cache`` of a fused q/k/v projection's output given as its split-K partial sums,
    fp32 ``partials [S, T, (Hq + 2 Hkv) * D]`` (``awq_mma(..., return_partials=True)``): adds
    them in split order as it loads them and rounds to ``dtype`` (the projection's own sum), then
    does what ``rope_and_cache`` does with the q, k and v views of that output; returns q
    ``[T, Hq, D]`` in ``dtype`` (k and v are only written to the caches). The same bits as the
    projection's sum followed by ``rope_and_cache``. No host syncs."""
    assert partials.dim() == 3 and partials.dtype == torch.float32 and partials.is_contiguous()
    split_k, num_tokens, width = partials.shape
    head_dim = key_cache.shape[3]
    assert width == (num_q_heads + 2 * num_kv_heads) * head_dim, "partials' width must be (Hq + 2 Hkv) * D"
    assert key_cache.shape[2] == num_kv_heads and value_cache.shape == key_cache.shape
    assert positions.shape == slot_mapping.shape == (num_tokens,)
    assert (q_norm_weight is None) == (k_norm_weight is None)
    assert key_cache.stride(-1) == value_cache.stride(-1) == 1, "the last dim must be contiguous"
    half_dim = head_dim // 2
    assert cos_cache.shape[1] == half_dim and sin_cache.stride() == cos_cache.stride()
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=dtype, device=partials.device)
    if num_tokens == 0:
        return q
    norm = q_norm_weight is not None
    _rope_and_cache_partials_kernel[(num_tokens, num_q_heads + num_kv_heads)](
        positions, partials, q, cos_cache, sin_cache,
        q_norm_weight if norm else cos_cache, k_norm_weight if norm else cos_cache,
        key_cache, value_cache, slot_mapping,
        num_tokens, num_q_heads, num_kv_heads, half_dim, eps,
        q.stride(0), q.stride(1), cos_cache.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        SPLIT_K=split_k, NORM=norm, BLOCK_SIZE=key_cache.shape[1], BLOCK_HALF=triton.next_power_of_2(half_dim),
        num_warps=num_warps,
        # As rope_and_cache: decode attention placed before this kernel waits on a one-token step.
        **pdl_args(partials.device, trigger_first=num_tokens == 1),
    )
    return q
