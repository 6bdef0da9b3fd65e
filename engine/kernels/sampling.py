"""Temperature sampling in one pass over the logits (Gumbel-max).

``argmax(logits / T + g)`` with ``g = -log(-log(u))`` Gumbel noise (``u`` uniform) draws token
``i`` with probability ``softmax(logits / T)[i]``, the same law as the sampler's exponential race
``argmax(softmax(logits / T) / e)`` (``-log e`` is Gumbel), without forming the softmax: the
logits are read once, the noise made in registers. For a batch of 256 rows over a 152k vocabulary
that is one read of 155 MB where the torch ops (divide, softmax, noise, clamp, divide, argmax)
make about a dozen passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _score(logits_ptr, row_offset, inv_temp, cols, hi, u, best_val, best_idx):
    ok = cols < hi
    logit = tl.load(logits_ptr + row_offset + cols, mask=ok, other=float("-inf"))
    score = tl.where(ok, logit.to(tl.float32) * inv_temp - tl.log(-tl.log(u)), float("-inf"))
    better = score > best_val
    return tl.where(better, score, best_val), tl.where(better, cols, best_idx)


# The seed changes every step and the chunk count with the batch: neither may pick a compiled
# variant (a compile takes seconds, inside whatever step meets a new one).
@triton.jit(do_not_specialize=["num_chunks", "seed"])
def _gumbel_argmax_kernel(
    logits_ptr, inv_temp_ptr, best_val_ptr, best_idx_ptr,
    vocab_size, stride_row, chunk_len, tiles_per_row, num_chunks, seed,
    BLOCK: tl.constexpr, RAND4X: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_rows, num_chunks)``: program (r, c) scans columns ``[c * chunk_len, (c + 1) *
    chunk_len)`` of row r (chunk_len a multiple of BLOCK) in BLOCK-wide tiles, scoring each
    ``logit * inv_temp[r] + gumbel`` (logits read in their own dtype, scored in float32) and
    writing its best score and column to ``best_*[r, c]`` (ties: the lowest column).

    Noise, a function of the seed and the element alone (so of neither the chunking nor the
    batch): with ``RAND4X``, one Philox call (``tl.rand4x``) gives a tile's four quarters their
    uniforms, counter ``(r * tiles_per_row + tile) * BLOCK / 4 + i``; otherwise one call per
    element (``tl.rand``, counter ``r * vocab_size + column``), four times the Philox work."""
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_temp = tl.load(inv_temp_ptr + row)
    row_offset = row.to(tl.int64) * stride_row
    lo = chunk * chunk_len
    hi = tl.minimum(lo + chunk_len, vocab_size)
    if RAND4X:
        QUARTER: tl.constexpr = BLOCK // 4
        lanes = tl.arange(0, QUARTER)
        best_val = tl.full((QUARTER,), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((QUARTER,), dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            u0, u1, u2, u3 = tl.rand4x(seed, (row * tiles_per_row + start // BLOCK) * QUARTER + lanes)
            cols = start + lanes
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols, hi, u0, best_val, best_idx)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols + QUARTER, hi, u1, best_val, best_idx)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols + 2 * QUARTER, hi, u2, best_val,
                                        best_idx)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols + 3 * QUARTER, hi, u3, best_val,
                                        best_idx)
    else:
        best_val = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            u = tl.rand(seed, row * vocab_size + cols)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols, hi, u, best_val, best_idx)
    top = tl.max(best_val, axis=0)
    idx = tl.min(tl.where(best_val == top, best_idx, vocab_size), axis=0)
    tl.store(best_val_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, idx)


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, seed: int, *,
                  num_chunks: int | None = None, block: int = 1024, rand4x: bool = True) -> torch.Tensor:
    """One token per row of ``logits`` [R, V] drawn from ``softmax(logits * inv_temperature[r])``
    (``inv_temperature`` [R] float32 on the same device), as int64 [R], with noise that is a
    function of ``seed`` (< 2**31) and the element alone. No host syncs."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and inv_temperature.shape == (rows,)
    assert block % 4 == 0 and rows * triton.cdiv(vocab, block) * block < 2**31, "Philox counters are 32-bit"
    assert 0 <= seed < 2**31
    if num_chunks is None:  # about 4 programs per SM for small batches, one chunk per row for big
        num_chunks = max(1, min(32, 512 // max(rows, 1)))
    chunk_len = triton.cdiv(triton.cdiv(vocab, num_chunks), block) * block
    best_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(rows, num_chunks)](
        logits, inv_temperature, best_val, best_idx, vocab, logits.stride(0), chunk_len,
        triton.cdiv(vocab, block), num_chunks, seed, BLOCK=block, RAND4X=rand4x, num_warps=4,
        **pdl_args(logits.device),
    )
    if num_chunks == 1:
        return best_idx[:, 0].long()
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True))[:, 0].long()
