"""Temperature sampling in one pass over the logits (Gumbel-max).

``argmax(logits / T + g)`` with ``g = -log(-log(u))`` Gumbel noise (``u`` uniform) draws token
``i`` with probability ``softmax(logits / T)[i]``, the same law as the sampler's exponential race
``argmax(softmax(logits / T) / e)`` (``-log e`` is Gumbel), without forming the softmax: the
logits are read once, the noise made in registers. For a batch of 256 rows over a 152k vocabulary
that is one read of 155 MB where the torch ops (divide, softmax, noise, clamp, divide, argmax)
make about a dozen passes. Greedy rows (``greedy_sample``) take the same kernel without noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.counters import arrival_counters
from engine.kernels.pdl import pdl_args, pdl_prologue


@triton.jit
def _score(logits_ptr, row_offset, inv_temp, cols, hi, u, best_val, best_idx, GREEDY: tl.constexpr):
    ok = cols < hi
    logit = tl.load(logits_ptr + row_offset + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if GREEDY:
        # torch.argmax's order: NaN above +inf above every finite value. Exact for 16-bit logits
        # (no finite one reaches float32's largest, which +inf becomes here).
        logit = tl.where(logit == float("inf"), 3.4028234663852886e38, logit)
        score = tl.where(ok, tl.where(logit != logit, float("inf"), logit), float("-inf"))
    else:
        score = tl.where(ok, logit * inv_temp - tl.log(-tl.log(u)), float("-inf"))
    better = score > best_val
    return tl.where(better, score, best_val), tl.where(better, cols, best_idx)


# Programs a row at most. One row of a 128-152k vocabulary on an H200, 20 launches back to back in
# a CUDA graph: 32 chunks 3.4-3.6 us a launch, 128 chunks 2.8-3.0 (bench/results/argmax_chunks_s23.json).
MAX_CHUNKS = 128
_MAX_CHUNKS = tl.constexpr(MAX_CHUNKS)


# The seed changes every step and the chunk count with the batch: neither may pick a compiled
# variant (a compile takes seconds, inside whatever step meets a new one).
@triton.jit(do_not_specialize=["num_chunks", "seed"])
def _argmax_kernel(
    logits_ptr, inv_temp_ptr, best_val_ptr, best_idx_ptr, arrivals_ptr, out_ptr,
    vocab_size, stride_row, chunk_len, tiles_per_row, num_chunks, seed,
    BLOCK: tl.constexpr, GREEDY: tl.constexpr, RAND4X: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid ``(num_rows, num_chunks)``: program (r, c) scans columns ``[c * chunk_len, (c + 1) *
    chunk_len)`` of row r (chunk_len a multiple of BLOCK) in BLOCK-wide tiles for the best score
    (ties: the lowest column) - with ``GREEDY`` the logit itself, otherwise ``logit * inv_temp[r]
    + gumbel`` (logits read in their own dtype, scored in float32). With one chunk it writes the
    column to ``out[r]``; with more, its best score and column to ``best_*[r, c]``, and the last
    of the row's programs to arrive (counter ``arrivals[r]``, which it resets) writes the column
    of the best chunk (ties: the first) to ``out[r]``: one launch.

    Noise, a function of the seed and the element alone (so of neither the chunking nor the
    batch): with ``RAND4X``, one Philox call (``tl.rand4x``) gives a tile's four quarters their
    uniforms, counter ``(r * tiles_per_row + tile) * BLOCK / 4 + i``; otherwise one call per
    element (``tl.rand``, counter ``r * vocab_size + column``), four times the Philox work."""
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if GREEDY:
        inv_temp = 1.0
    else:
        inv_temp = tl.load(inv_temp_ptr + row)
    row_offset = row.to(tl.int64) * stride_row
    lo = chunk * chunk_len
    hi = tl.minimum(lo + chunk_len, vocab_size)
    if RAND4X and not GREEDY:
        QUARTER: tl.constexpr = BLOCK // 4
        lanes = tl.arange(0, QUARTER)
        best_val = tl.full((QUARTER,), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((QUARTER,), dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            u0, u1, u2, u3 = tl.rand4x(seed, (row * tiles_per_row + start // BLOCK) * QUARTER + lanes)
            cols = start + lanes
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols, hi, u0, best_val, best_idx, False)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols + QUARTER, hi, u1, best_val, best_idx,
                                        False)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols + 2 * QUARTER, hi, u2, best_val,
                                        best_idx, False)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols + 3 * QUARTER, hi, u3, best_val,
                                        best_idx, False)
    else:
        best_val = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            if GREEDY:
                u = 0.5  # unused
            else:
                u = tl.rand(seed, row * vocab_size + cols)
            best_val, best_idx = _score(logits_ptr, row_offset, inv_temp, cols, hi, u, best_val, best_idx, GREEDY)
    top = tl.max(best_val, axis=0)
    idx = tl.min(tl.where(best_val == top, best_idx, vocab_size), axis=0)
    if num_chunks == 1:
        tl.store(out_ptr + row, idx.to(tl.int64))
    else:
        tl.store(best_val_ptr + row * num_chunks + chunk, top)
        tl.store(best_idx_ptr + row * num_chunks + chunk, idx)
        tl.debug_barrier()  # the partial is written before the release below
        arrived = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == num_chunks - 1:
            c = tl.arange(0, _MAX_CHUNKS)
            vals = tl.load(best_val_ptr + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"),
                           cache_modifier=".cg")
            first = tl.min(tl.where(vals == tl.max(vals, axis=0), c, _MAX_CHUNKS), axis=0)
            tl.store(out_ptr + row, tl.load(best_idx_ptr + row * num_chunks + first).to(tl.int64))
            tl.atomic_xchg(arrivals_ptr + row, 0, sem="relaxed", scope="gpu")


def _launch(logits: torch.Tensor, inv_temperature: torch.Tensor | None, seed: int, num_chunks: int | None,
            block: int, rand4x: bool, out: torch.Tensor | None) -> torch.Tensor:
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    if num_chunks is None:  # about 4 programs per SM for small batches, one chunk per row for big
        num_chunks = max(1, min(MAX_CHUNKS, 512 // max(rows, 1)))
    assert 1 <= num_chunks <= MAX_CHUNKS
    chunk_len = triton.cdiv(triton.cdiv(vocab, num_chunks), block) * block
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (rows,) and out.dtype == torch.int64 and out.device == logits.device
    best_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    greedy = inv_temperature is None
    arrivals = arrival_counters(logits.device, rows if num_chunks > 1 else 0)
    _argmax_kernel[(rows, num_chunks)](
        logits, logits if greedy else inv_temperature, best_val, best_idx, arrivals, out,
        vocab, logits.stride(0), chunk_len, triton.cdiv(vocab, block), num_chunks, seed,
        BLOCK=block, GREEDY=greedy, RAND4X=rand4x, num_warps=4, **pdl_args(logits.device),
    )
    return out


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, seed: int, *,
                  num_chunks: int | None = None, block: int = 1024, rand4x: bool = True,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [R, V] drawn from ``softmax(logits * inv_temperature[r])``
    (``inv_temperature`` [R] float32 on the same device), as int64 [R], with noise that is a
    function of ``seed`` (< 2**31) and the element alone, into ``out`` if given. One launch, no
    host syncs."""
    rows, vocab = logits.shape
    assert inv_temperature.shape == (rows,)
    assert block % 4 == 0 and rows * triton.cdiv(vocab, block) * block < 2**31, "Philox counters are 32-bit"
    assert 0 <= seed < 2**31
    return _launch(logits, inv_temperature, seed, num_chunks, block, rand4x, out)


def greedy_sample(logits: torch.Tensor, *, num_chunks: int | None = None, block: int = 1024,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for ``logits`` [R, V] (int64 [R], into ``out`` if given; ties and
    NaN as torch breaks them) in one launch, split over up to MAX_CHUNKS programs a row: torch's
    reduction took 36 us for one row of Llama-3.1-8B's 128k logits on an H200 (profile_step
    --single)."""
    return _launch(logits, None, 0, num_chunks, block, False, out)
