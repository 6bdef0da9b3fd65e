"""Tensor-core AWQ linear for 1-16 tokens on Hopper: ``awq_mma`` (a Gluon kernel).

The Triton-language kernels in awq_gemm.py hand a dequantized weight tile to the tensor cores
through shared memory (``tl.dot`` wants its operand in the MMA's register layout, and only a
round trip through shared memory gets it there), or, in the gemv, skip the tensor cores and pay
an FFMA per weight and token. This kernel is written in Gluon, Triton's layout-explicit
dialect: the registers a thread unpacks from its packed words *are* its part of the MMA operand,
so a weight costs about one ALU instruction (a PRMT per 8, a shift per 2.7, a LOP3 per 2) and
reaches ``mma.sync`` without touching shared memory again; the tokens ride on the MMA's narrow
side (up to 8 of them cost the same MMAs as one).

How a thread's registers line up (``_unpack``): ``mma.sync.m16n8k16`` takes its A operand as
pairs (k, k + 1) of one row. Row r of the A tile is output column ``8 word + c`` of the weight
(the weight tile is the transposed product's A side: 64 columns a warp), so one PRMT of the
words at rows k and k + 1 puts byte j of each in the two 16-bit halves of a register, and each
column's nibble pair is then one LOP3 (after a shift for 6 of the 8 columns) into the
exponent-biased floats MAGIC + q (128 + q in bf16, 1024 + q in fp16: exact). The zero point
comes out per K tile through the activations' sums, which one more MMA against a tile of ones
gives: sum x (MAGIC + q) - (MAGIC + z) sum x = sum x (q - z), then times the scale, in fp32.

Gluon kernels do not run under TRITON_INTERPRET=1: CI checks this one by compiling it for sm_90
with the installed Triton and by running its unpacking PTX through a small PTX interpreter
(tests/test_awq_mma.py); its numerics are tested on the GPU against a float64 reference.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton

from engine.kernels.counters import arrival_counters
from engine.kernels.pdl import pdl_args

if TYPE_CHECKING:
    from engine.kernels.decode_attention import DecodeSplits

# Above this many tokens the fused kernel (awq_gemm) takes over.
MMA_MAX_TOKENS = 16
BLOCK_K = 128  # one MMA group of K rows; a TMA stage holds one or two of them (``MmaConfig.halves``)
WARPS = 2  # warps a program: 64 output columns each

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    from triton.runtime.jit import constexpr_function

    # Gluon's API moves between releases: this kernel is built and tested with Triton 3.6 (the GPU
    # machine) and 3.9 (CI, compile only).
    HAVE_GLUON = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 6)
except ImportError:  # Triton without Gluon: awq_linear keeps to awq_gemm.py's kernels
    HAVE_GLUON = False

# After HAVE_GLUON: awq_gemm.py imports this module and awq_wgmma.py (which reads HAVE_GLUON) at
# its end, so importing this module first works too.
from engine.kernels.awq_gemm import _check_shapes, _num_sms, _tma_rows  # noqa: E402


def _unpack_ptx(magic: int) -> str:
    """The unpacking asm, for one pair of packed words (rows k and k + 1: operands $8, $9) ->
    eight registers $0..$7 = columns 0..7 as the floats MAGIC + q of row k (low half) and k + 1
    (high half). Column c sits in nibble c // 2 + 4 (c % 2) (AWQ order 0, 2, 4, 6, 1, 3, 5, 7):
    t0 holds nibbles 0-3 of both words (a PRMT of their low bytes), t1 nibbles 4-7, and column c
    is nibble c // 2 of t(c % 2), masked in place (c < 2) or after a shift."""
    lines = ["{", ".reg .b32 t0, t1, u;", "prmt.b32 t0, $8, $9, 0x5410;", "prmt.b32 t1, $8, $9, 0x7632;"]
    for c in range(8):
        src = f"t{c % 2}"
        if c >= 2:
            lines.append(f"shr.u32 u, {src}, {4 * (c // 2)};")
            src = "u"
        lines.append(f"lop3.b32 ${c}, {src}, 0x000F000F, {magic:#010x}, 0xEA;")
    return "\n".join(lines + ["}"])


UNPACK_BF16_PTX = _unpack_ptx(0x43004300)  # 128.0 in both halves
UNPACK_FP16_PTX = _unpack_ptx(0x64006400)  # 1024.0


class MmaConfig(NamedTuple):
    halves: int  # 128-row K tiles a pipeline stage holds (1 or 2)
    split_k: int  # programs along K
    num_stages: int = 2  # stages in flight: 3-4 measured slower on an H200


def mma_config(m: int, n: int, k: int, num_sms: int) -> MmaConfig:
    """The tiling, from a sweep on an H200 (``bench/bench_awq_linear.py --mma-sweep``,
    bench/results/awq_mma_s15_sweep.json: Llama-3.1-8B shapes, 1-16 tokens, 2 or 3 stages,
    128- or 256-row stages, split-K at 1-8 programs per SM). Two stages everywhere. Up to 4
    tokens, 128-row stages and split-K to about 4 programs per SM (a layer's four linears 50.4 us
    at one token, against 49.9 for each shape's best); from 5 tokens, where the split-K partials
    grow with the tokens, 256-row stages and about 2 programs per SM (64.4 us at 16 tokens against
    66.6 with the first rule), unless that splits the 256-row stages unevenly (qkv: 13.8 against
    11.6 us at 16 tokens), then 128-row ones."""
    blocks = n // (64 * WARPS)
    halves, programs = (1, 4 * num_sms) if m <= 4 else (2 if k % (2 * BLOCK_K) == 0 else 1, 2 * num_sms)
    split_k = max(1, min(k // (BLOCK_K * halves), round(programs / blocks)))
    if halves == 2 and (k // (2 * BLOCK_K)) % split_k:
        halves, split_k = 1, max(1, min(k // BLOCK_K, round(programs / blocks)))
    return MmaConfig(halves, split_k)


@functools.cache
def _enabled(device: torch.device) -> bool:
    """Gluon there, not the interpreter, not turned off, and TMA with mbarrier transactions
    (compute capability 9 or newer): decided once per device, off the per-call path."""
    return (HAVE_GLUON and os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("SLUICE_AWQ_MMA", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def mma_supported(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Whether ``awq_mma`` takes these activations and weight: a Hopper-or-newer GPU with Gluon,
    fp16 or bf16 activations, N % 128 == 0, K % 128 == 0 and groups of a multiple of 128 rows (or
    one over all of K). ``SLUICE_AWQ_MMA=0`` in the environment at start-up turns it off (the
    Triton-language kernels then take these shapes)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _enabled(x.device)
            and n % (64 * WARPS) == 0 and k % BLOCK_K == 0 and (group_size % BLOCK_K == 0 or group_size == k))


def _descriptors(x: torch.Tensor, qweight: torch.Tensor, block_t: int, tile_k: int):
    """TMA descriptors of the activations ([block_t, tile_k] boxes, 128-byte swizzle) and the
    packed weight ([tile_k, 16] words, 64-byte rows with a 64-byte swizzle)."""
    gl_dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = GluonTensorDescriptor.from_tensor(
        _tma_rows(x), [block_t, tile_k], gl.NVMMASharedLayout.get_default_for([block_t, tile_k], gl_dtype))
    w_desc = GluonTensorDescriptor.from_tensor(
        qweight, [tile_k, 8 * WARPS], gl.NVMMASharedLayout(swizzle_byte_width=32 * WARPS, element_bitwidth=32, rank=2))
    return x_desc, w_desc


def splits_fit(qweight: torch.Tensor, splits: DecodeSplits) -> bool:
    """Whether ``awq_mma(..., splits=splits)`` takes decode attention's partials for this weight:
    one request (one token), 128-row stages, and each program's K rows whole heads of 128, two of
    them at most (Llama-3.1-8B's o projection: 16 programs of two heads a column block). At 2-4
    requests each program would read 2-4 times the partials, and at 4 the step was slower than
    with the reduction's kernel (H200, docs/benchmarks.md, session 33)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    cfg = mma_config(1, n, k, _num_sms(qweight.device))
    k_per_split = triton.cdiv(k // BLOCK_K, cfg.split_k) * BLOCK_K
    num_reqs, num_heads, num_splits, head_dim = splits.part_out.shape
    return (num_reqs == 1 and cfg.halves == 1 and head_dim == BLOCK_K and num_heads * head_dim == k
            and k % k_per_split == 0 and k_per_split <= 2 * BLOCK_K and num_splits <= 16)


def awq_mma(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            config: MmaConfig | None = None, return_partials: bool = False,
            splits: DecodeSplits | None = None) -> torch.Tensor:
    """``x`` [M, K] (fp16 or bf16, M <= 16) times the AWQ weight -> [M, N] in x's dtype, on the
    tensor cores (see the module docstring). Needs ``mma_supported``; ``config`` overrides
    ``mma_config``. ``return_partials``: the split-K partial sums instead, fp32 [split_k, M, N]
    (split_k may be 1), for a next kernel that adds them in split order as it loads its input
    (``silu_and_mul_partials``, ``rope_and_cache_partials``; engine/layers/partials.py): the
    linear then ends with its last main loop, without the last-arriving program's sum.
    ``splits`` (``splits_fit``): ``x`` is one request's decode attention output buffer
    ``splits.out``, not yet written, and each program forms its activations from the splits'
    partials of the heads its K rows cover after the PDL wait, in place of the split reduction's
    kernel."""
    m, k_x = x.shape
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    assert 1 <= m <= MMA_MAX_TOKENS, f"awq_mma takes 1 to {MMA_MAX_TOKENS} tokens, got {m}"
    assert k_x == k, f"x has {k_x} features, the weight {k}"
    assert mma_supported(x, qweight, group_size), "awq_mma does not take this device, dtype or shape"
    cfg = MmaConfig(*config) if config else mma_config(m, n, k, _num_sms(x.device))
    assert cfg.halves in (1, 2) and k % (BLOCK_K * cfg.halves) == 0
    block_t = 8 if m <= 8 else 16
    tile_k = BLOCK_K * cfg.halves
    k_per_split = triton.cdiv(k // tile_k, cfg.split_k) * tile_k
    split_k = triton.cdiv(k, k_per_split)
    n_tiles = n // (64 * WARPS)
    x_desc, w_desc = _descriptors(x, qweight, block_t, tile_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) \
        if split_k > 1 or return_partials else out
    attn = {}
    if splits is not None:
        assert config is None and splits_fit(qweight, splits), "awq_mma cannot combine these decode splits"
        assert splits.out.data_ptr() == x.data_ptr()
        attn = dict(ATTN_SPLITS=splits.part_out.shape[2],
                    ATTN_SPLITS_P2=triton.next_power_of_2(splits.part_out.shape[2]), ATTN_BLOCK_N=splits.block_n,
                    ATTN_WINDOW=bool(splits.window), ATTN_TILES=k_per_split // tile_k)
        attn_args = (splits.part_out, splits.part_lse, splits.seq_lens, splits.window)
    else:
        attn_args = (partial, partial, partial, 0)  # not read
    _awq_mma_kernel[(n_tiles, split_k)](
        x_desc, w_desc, qzeros, scales, out, partial, arrival_counters(x.device, n_tiles), m, k_per_split, split_k,
        *attn_args,
        N=n, K=k, GROUP=group_size, BLOCK_T=block_t, HALVES=cfg.halves, NUM_STAGES=cfg.num_stages,
        PARTIALS_ONLY=return_partials, num_warps=WARPS, **attn, **pdl_args(x.device),
    )
    return partial if return_partials else out


if HAVE_GLUON:
    # Triton 3.9 renamed the TMA load (its old name raises there) and the CTA barrier.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _UNPACK_BF16 = gl.constexpr(UNPACK_BF16_PTX)
    _UNPACK_FP16 = gl.constexpr(UNPACK_FP16_PTX)
    _UNPACK_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))
    _BLOCK_K, _WARPS = gl.constexpr(BLOCK_K), gl.constexpr(WARPS)

    @constexpr_function
    def _mma_layout(warps):
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])

    @constexpr_function
    def _operand_layout(warps, index):
        return gl.DotOperandLayout(operand_index=index, parent=_mma_layout(warps), k_width=2)

    @constexpr_function
    def _words_layout(warps, rows):
        """Packed words [rows k, 8 warps] as threads read them from shared memory: lanes on k bits
        1-2 and their warp's 8 words, registers on k bit 0 (the MMA's pair) and bits 3 and up."""
        return gl.DistributedLinearLayout(
            reg_bases=[[1, 0]] + [[r, 0] for r in (8, 16, 32, 64) if r < rows],
            lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
            warp_bases=[[0, 8 << i] for i in range(warps.bit_length() - 1)], block_bases=[], shape=[rows, 8 * warps])

    @constexpr_function
    def _unpack_layout(warps, rows):
        """[4 (c1, c2), warps, 2 (c0), 8 words, rows k]: a thread's first 16 registers are the pair
        k, k + 1 of the 8 columns c = c0 + 2 c1 + 4 c2 of one word, the order the asm takes."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0], [2, 0, 0, 0, 0]]
            + [[0, 0, 0, 0, r] for r in (8, 16, 32, 64) if r < rows],
            lane_bases=[[0, 0, 0, 0, 2], [0, 0, 0, 0, 4], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0]],
            warp_bases=[[0, 1 << i, 0, 0, 0] for i in range(warps.bit_length() - 1)], block_bases=[],
            shape=[4, warps, 2, 8, rows])

    @constexpr_function
    def _cols_layout(warps):
        """[64 warps] consecutive output columns held as the MMA rows' threads hold them: a thread
        the 8 columns of one word, lanes 2-4 on its warp's 8 words."""
        return gl.DistributedLinearLayout(
            reg_bases=[[1], [2], [4]], lane_bases=[[0], [0], [8], [16], [32]],
            warp_bases=[[64 << i] for i in range(warps.bit_length() - 1)], block_bases=[], shape=[64 * warps])

    @constexpr_function
    def _out_layout(warps, block_t):
        """The result [block_t tokens, 64 warps columns] in column order, a thread's 8 consecutive
        columns of a token first in its registers (16-byte stores)."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [1, 0]] + ([[8, 0]] if block_t == 16 else []),
            lane_bases=[[2, 0], [4, 0], [0, 8], [0, 16], [0, 32]],
            warp_bases=[[0, 64 << i] for i in range(warps.bit_length() - 1)], block_bases=[],
            shape=[block_t, 64 * warps])

    @gluon.jit
    def _unpack(words, DTYPE: gl.constexpr, W: gl.constexpr, ROWS: gl.constexpr):
        """words [ROWS k, 8 W] -> the A operand [64 W, ROWS k] of MAGIC + q. Row r is column
        8 word + c with word = 8 ((r // 16) % W) + r % 8, c = (r // 8) % 2 + 2 (r // (16 W)): the
        rows the MMA gives a thread are its word's 8 columns. Every layout change here only
        renames registers (asserted)."""
        L5: gl.constexpr = _unpack_layout(W, ROWS)
        w = gl.permute(words, (1, 0)).reshape([W, 8, ROWS])
        w = gl.convert_layout(w, gl.SliceLayout(0, gl.SliceLayout(2, L5)), assert_trivial=True)
        w5 = gl.expand_dims(gl.expand_dims(w, 0), 2).broadcast_to([4, W, 2, 8, ROWS])
        if DTYPE == gl.bfloat16:
            q = gl.inline_asm_elementwise(_UNPACK_BF16, _UNPACK_CONSTRAINTS, [w5], dtype=gl.bfloat16,
                                          is_pure=True, pack=16)
        else:
            q = gl.inline_asm_elementwise(_UNPACK_FP16, _UNPACK_CONSTRAINTS, [w5], dtype=gl.float16,
                                          is_pure=True, pack=16)
        return gl.convert_layout(q.reshape([64 * W, ROWS]), _operand_layout(W, 0), assert_trivial=True)

    @gluon.jit
    def _load_scales(scales_ptr, n0, W: gl.constexpr, MMA: gl.constexpr):
        """The scales of the 64 W columns from n0 (a 16-byte load a thread), in the MMA's row order."""
        s = gl.load(scales_ptr + n0 + gl.arange(0, 64 * W, layout=_cols_layout(W)))
        s = gl.permute(s.reshape([W, 8, 4, 2]), (2, 0, 3, 1)).reshape([64 * W])
        return gl.convert_layout(s, gl.SliceLayout(1, MMA), assert_trivial=True)

    @gluon.jit
    def _rows_times4(xs, MMA: gl.constexpr):
        """[R, T] whose rows are equal -> [4 R, T] in the MMA layout: register copies only."""
        xs2 = gl.permute(gl.join(xs, xs), (2, 0, 1)).reshape([2 * xs.shape[0], xs.shape[1]])
        xs4 = gl.permute(gl.join(xs2, xs2), (2, 0, 1)).reshape([4 * xs.shape[0], xs.shape[1]])
        return gl.convert_layout(xs4, MMA, assert_trivial=True)

    @gluon.jit
    def _group(acc, w_smem, x_smem, zero_words, scales, zero_shift, ones, DTYPE: gl.constexpr,
               W: gl.constexpr, BLOCK_T: gl.constexpr, MMA: gl.constexpr, KSPLIT: gl.constexpr):
        """acc + one 128-row K tile (inside one group): s (sum x (MAGIC + q) - (MAGIC + z) sum x).
        KSPLIT = 2 sums the tile's two 64-row halves in separate MMA chains (4 dependent MMAs
        instead of 8)."""
        ROWS: gl.constexpr = _BLOCK_K // KSPLIT
        a = _unpack(w_smem.slice(0, ROWS).load(_words_layout(W, ROWS)), DTYPE, W, ROWS)
        xb = x_smem.slice(0, ROWS, dim=1).permute((1, 0)).load(_operand_layout(W, 1))
        part = mma_v2(a, xb, gl.zeros([64 * W, BLOCK_T], gl.float32, layout=MMA))
        x_sums = mma_v2(ones, xb, gl.zeros([16 * W, BLOCK_T], gl.float32, layout=MMA))
        if KSPLIT == 2:
            a = _unpack(w_smem.slice(ROWS, ROWS).load(_words_layout(W, ROWS)), DTYPE, W, ROWS)
            xb = x_smem.slice(ROWS, ROWS, dim=1).permute((1, 0)).load(_operand_layout(W, 1))
            part += mma_v2(a, xb, gl.zeros([64 * W, BLOCK_T], gl.float32, layout=MMA))
            x_sums = mma_v2(ones, xb, x_sums)
        x_sums = _rows_times4(x_sums, MMA)
        magic_z = ((zero_words >> zero_shift) & 0xF).to(gl.float32) + (128.0 if DTYPE == gl.bfloat16 else 1024.0)
        return acc + scales.to(gl.float32)[:, None] * (part - magic_z[:, None] * x_sums)


    @gluon.jit
    def _pdl_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _prefetch_x_descriptor():
        """Bring the activations' TMA descriptor (the kernel's first parameter, ``x_desc``) into
        the TMA unit's cache: its first load comes after the PDL wait, on the critical path, where
        the weight descriptor's first load is requested before the wait (Llama-3.1-8B AWQ's
        one-token step 1.915 -> 1.908 ms on an H200, docs/benchmarks.md, session 32). The
        parameter is named as Triton names it in the PTX; tests/test_awq_mma.py checks that the
        first load after the wait uses it."""
        gl.inline_asm_elementwise("prefetch.param.tensormap [_awq_mma_kernel_param_0]; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _split_span(seq_lens_ptr, window, S: gl.constexpr, BLOCK_N: gl.constexpr, WINDOW: gl.constexpr):
        """decode_attention.py's ``_split_span`` for request 0: how many of its S splits hold keys."""
        seq_len = gl.load(seq_lens_ptr)
        if WINDOW:
            kv_lo = gl.maximum(seq_len - window, 0)
        else:
            kv_lo = 0
        split_len = gl.cdiv(gl.cdiv(seq_len - kv_lo, S), BLOCK_N) * BLOCK_N
        return gl.cdiv(seq_len - kv_lo, gl.maximum(split_len, 1))

    @gluon.jit
    def _combine_head(part_out_ptr, part_lse_ptr, head, used, S: gl.constexpr, S_P2: gl.constexpr, L: gl.constexpr):
        """Head ``head`` of request 0's attention output [128] (layout SliceLayout(0, L), each
        thread every split of its columns): its first ``used`` splits' outputs weighted by
        exp2(lse - max lse) and normalised, zeros without keys. The bits of decode_attention.py's
        ``_decode_reduce_kernel`` (one warp there): each column's weighted sum in split order
        within a thread, and the weights' sum across one split a lane (a butterfly over the lanes,
        as there); the two layouts compute the same weights."""
        s = gl.arange(0, S_P2, layout=gl.SliceLayout(1, L))
        d = gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, L))
        part = head * S + s
        lse = gl.load(part_lse_ptr + part, mask=s < used, other=float("-inf"))
        parts = gl.load(part_out_ptr + part[:, None] * _BLOCK_K + d[None, :], mask=(s < used)[:, None], other=0.0)
        lse_max = gl.maximum(gl.max(lse, 0), -1.0e30)
        LANES: gl.constexpr = gl.BlockedLayout([1], [32], [_WARPS], [0])
        s_lane = gl.arange(0, S_P2, layout=LANES)
        lse_lane = gl.load(part_lse_ptr + head * S + s_lane, mask=s_lane < used, other=float("-inf"))
        total = gl.sum(gl.exp2(lse_lane - lse_max), 0)
        weight = gl.exp2(lse - lse_max)
        return gl.sum(weight[:, None] * parts, 0) / gl.where(total > 0.0, total, 1.0)

    @gluon.jit
    def _sum_rows(out_ptr, partial_ptr, t0, c0, M, N, split_k, R: gl.constexpr, C: gl.constexpr,
                  UNROLL: gl.constexpr, RL: gl.constexpr):
        """Tokens t0 .. t0 + R - 1 (those below M) of output columns c0 .. c0 + C - 1: the sum of
        the split_k fp32 partials (``partial_ptr`` [split_k, M, N]) in split order, UNROLL loads
        in flight, stored to the output in its dtype (layout RL)."""
        rt = t0 + gl.arange(0, R, layout=gl.SliceLayout(1, RL))
        rc = c0 + gl.arange(0, C, layout=gl.SliceLayout(0, RL))
        offs = rt[:, None] * N + rc[None, :]
        ok = (rt < M)[:, None] & (rc < N)[None, :]
        total = gl.zeros([R, C], gl.float32, layout=RL)
        for s0 in range(0, split_k, UNROLL):
            for j in gl.static_range(UNROLL):
                total += gl.load(partial_ptr + (s0 + j) * M * N + offs, mask=ok & (s0 + j < split_k), other=0.0,
                                 cache_modifier=".cg")
        gl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)

    @gluon.jit
    def _store_split_k(acc, out_ptr, partial_ptr, lock_ptr, lock, t0, c0, M, N, split, split_k, L: gl.constexpr,
                       R: gl.constexpr, RL: gl.constexpr, UNROLL: gl.constexpr = 4, FEW_TOKENS: gl.constexpr = False):
        """awq_gemm.py's _store_split_k, as Gluon needs it (its zeros take a layout): the fp32 tile
        ``acc`` (layout L) of tokens t0 .. and columns c0 .. to the output in its dtype, or with
        split_k > 1 to the partials at ``split``, the last program of the output block to arrive
        (counter ``lock_ptr[lock]``, reset by it) summing them in split order, R tokens at a time
        in layout RL with UNROLL partials in flight. FEW_TOKENS (t0 == 0): for up to 4 tokens,
        those rows alone with 16 partials in flight (there the sum is a chain of round trips to
        L2 on the kernel's critical path)."""
        T: gl.constexpr = acc.shape[0]
        C: gl.constexpr = acc.shape[1]
        ot = t0 + gl.arange(0, T, layout=gl.SliceLayout(1, L))
        oc = c0 + gl.arange(0, C, layout=gl.SliceLayout(0, L))
        offs = ot[:, None] * N + oc[None, :]
        ok = (ot < M)[:, None] & (oc < N)[None, :]
        if split_k == 1:
            gl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            gl.store(partial_ptr + split * M * N + offs, acc, mask=ok)
            _cta_barrier()  # every warp's partials are written before the release below
            arrived = gl.atomic_add(lock_ptr + lock, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                FL: gl.constexpr = gl.BlockedLayout([1, C // (32 * gl.num_warps())], [1, 32], [1, gl.num_warps()],
                                                    [1, 0])
                if FEW_TOKENS and M == 1:
                    _sum_rows(out_ptr, partial_ptr, 0, c0, M, N, split_k, 1, C, 16, FL)
                elif FEW_TOKENS and M <= 4:
                    _sum_rows(out_ptr, partial_ptr, 0, c0, M, N, split_k, 4, C, 16, FL)
                else:
                    for r in gl.static_range(0, T, R):
                        _sum_rows(out_ptr, partial_ptr, t0 + r, c0, M, N, split_k, R, C, UNROLL, RL)
                gl.atomic_xchg(lock_ptr + lock, 0, sem="relaxed", scope="gpu")

    @gluon.jit
    def _awq_mma_kernel(x_desc, w_desc, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, lock_ptr,
                        M, k_per_split, split_k, attn_out_ptr, attn_lse_ptr, seq_lens_ptr, attn_window,
                        N: gl.constexpr, K: gl.constexpr, GROUP: gl.constexpr, BLOCK_T: gl.constexpr,
                        HALVES: gl.constexpr, NUM_STAGES: gl.constexpr, PARTIALS_ONLY: gl.constexpr = False,
                        ATTN_SPLITS: gl.constexpr = 0, ATTN_SPLITS_P2: gl.constexpr = 1,
                        ATTN_BLOCK_N: gl.constexpr = 1, ATTN_WINDOW: gl.constexpr = False,
                        ATTN_TILES: gl.constexpr = 1, USE_PDL: gl.constexpr = False):
        """Grid ``(N / 128, split_k)``, 2 warps a program. Program (p, s) owns output columns
        128 p .. 128 p + 127 (warp g the 64 from 128 p + 64 g) for up to BLOCK_T (8 or 16) tokens
        and the K rows s * k_per_split ..; K % (128 HALVES) == 0, and a 128-row tile lies in one
        group.

        Pipeline: each stage is one TMA load of the packed weight [128 HALVES, 16 words] (64-byte
        rows, 64-byte swizzle: the threads' reads are conflict-free) and one of the activations
        [BLOCK_T, 128 HALVES] (rows past M read 0) on one mbarrier, NUM_STAGES - 1 stages ahead;
        the first weight stages are requested before the PDL wait (weights are never written),
        and the activations' TMA descriptor prefetched (its first load follows the wait). The zero
        points and scales of the next stage load a step ahead into registers (before the wait, the
        first stage's made the step slower: docs/experiments.md). Per 128-row tile a warp issues
        32 mma.sync (4 per 16-row slice: 64 columns x BLOCK_T tokens) plus 8 against a tile of
        ones for the activations' sums (``_group``).

        With split_k > 1 the programs of a column block store fp32 partials and the last to
        arrive (counter ``lock_ptr[p]``, reset by it) sums them in order: deterministic. For up
        to 4 tokens it loads their rows alone, 16 partials at a time (one round trip to L2
        instead of four at split-K 16: a layer's four linears at one token 50.0 -> 47.5 us on an
        H200, bench/results/awq_mma_s19_one_token_sum.json; at 4 tokens o 7.82 -> 6.27 us, down
        14.21 -> 12.96, awq_split_k_sum_s20.json).

        With ATTN_SPLITS (M == 1) the activation row is one request's decode attention output,
        left as its splits' partials (``attn_out_ptr`` [1, H, ATTN_SPLITS, 128], ``attn_lse_ptr``
        [1, H, ATTN_SPLITS]): the program's ATTN_TILES 128-row K tiles are whole heads, and after
        the PDL wait it combines each head's splits (``_combine_head``) into shared memory, the
        other token rows zero, where TMA would have put them; its stages then carry weights
        alone. This takes the split reduction's kernel out of the layer (Llama-3.1-8B AWQ one
        token 1.909 -> 1.878 ms a step on an H200, session 33): the o projection's programs read
        16 KB of partials each instead of 512 bytes of activations."""
        DTYPE: gl.constexpr = x_desc.dtype
        W: gl.constexpr = _WARPS
        MMA: gl.constexpr = _mma_layout(W)
        N_WORDS: gl.constexpr = N // 8
        BLOCK_W: gl.constexpr = 8 * W
        TILE_K: gl.constexpr = _BLOCK_K * HALVES
        # Two MMA chains a tile where registers allow (8 tokens, 128-row stages: 1-4% faster on an H200).
        KSPLIT: gl.constexpr = 2 if BLOCK_T == 8 and HALVES == 1 else 1
        X_BYTES: gl.constexpr = 0 if ATTN_SPLITS else BLOCK_T * TILE_K * 2
        STAGE_BYTES: gl.constexpr = TILE_K * BLOCK_W * 4 + X_BYTES
        pid_n = gl.program_id(0)
        pid_s = gl.program_id(1)
        w0 = pid_n * BLOCK_W
        k_lo = pid_s * k_per_split
        n_tiles = (gl.minimum(k_lo + k_per_split, K) - k_lo) // TILE_K

        w_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, TILE_K, BLOCK_W], w_desc.layout)
        x_smem = gl.allocate_shared_memory(DTYPE, [ATTN_TILES if ATTN_SPLITS else NUM_STAGES, BLOCK_T, TILE_K],
                                           x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        for i in gl.static_range(NUM_STAGES - 1):
            mbarrier.expect(bars.index(i), STAGE_BYTES, pred=i < n_tiles)
            _tma_load(w_desc, [k_lo + i * TILE_K, w0], bars.index(i), w_smem.index(i), pred=i < n_tiles)
        if ATTN_SPLITS:
            # Before the wait: how many splits hold keys, from this step's length (a host copy).
            used = _split_span(seq_lens_ptr, attn_window, ATTN_SPLITS, ATTN_BLOCK_N, ATTN_WINDOW)
            if USE_PDL:
                _pdl_wait()
            AL: gl.constexpr = gl.BlockedLayout([ATTN_SPLITS_P2, 2], [1, 32], [1, W], [1, 0])
            XL: gl.constexpr = gl.BlockedLayout([BLOCK_T, 2], [1, 32], [1, W], [1, 0])
            token = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, XL))[:, None]
            for i in gl.static_range(ATTN_TILES):
                x = _combine_head(attn_out_ptr, attn_lse_ptr, k_lo // _BLOCK_K + i, used, ATTN_SPLITS,
                                  ATTN_SPLITS_P2, AL)
                tile = gl.where(token == 0, gl.convert_layout(x, gl.SliceLayout(0, XL))[None, :], 0.0)
                x_smem.index(i).store(tile.to(DTYPE))
            _cta_barrier()  # both warps' rows are in shared memory before either reads them
        else:
            if USE_PDL:
                _prefetch_x_descriptor()
                _pdl_wait()
            for i in gl.static_range(NUM_STAGES - 1):
                _tma_load(x_desc, [0, k_lo + i * TILE_K], bars.index(i), x_smem.index(i), pred=i < n_tiles)

        rows = gl.arange(0, 64 * W, layout=gl.SliceLayout(1, MMA))
        word = w0 + 8 * ((rows // 16) % W) + rows % 8
        c = (rows // 8) % 2 + 2 * (rows // (16 * W))
        zero_shift = 4 * (c // 2 + 4 * (c % 2))
        ones = gl.full([16 * W, _BLOCK_K // KSPLIT], 1.0, DTYPE, layout=_operand_layout(W, 0))

        # Zero points and scales of the stage's first and second 128-row tile (the second is
        # unused, and its loads dropped, when HALVES == 1).
        za_next = gl.load(qzeros_ptr + (k_lo // GROUP) * N_WORDS + word)
        sa_next = _load_scales(scales_ptr, (k_lo // GROUP) * N + 8 * w0, W, MMA)
        kb = gl.minimum(k_lo + _BLOCK_K, K - _BLOCK_K)
        zb_next = gl.load(qzeros_ptr + (kb // GROUP) * N_WORDS + word)
        sb_next = _load_scales(scales_ptr, (kb // GROUP) * N + 8 * w0, W, MMA)
        acc = gl.zeros([64 * W, BLOCK_T], gl.float32, layout=MMA)
        for t in range(n_tiles):
            nt = t + NUM_STAGES - 1
            fence_async_shared()  # this slot's last reads (a step ago) before the async write
            mbarrier.expect(bars.index(nt % NUM_STAGES), STAGE_BYTES, pred=nt < n_tiles)
            _tma_load(w_desc, [k_lo + nt * TILE_K, w0], bars.index(nt % NUM_STAGES), w_smem.index(nt % NUM_STAGES),
                      pred=nt < n_tiles)
            if not ATTN_SPLITS:
                _tma_load(x_desc, [0, k_lo + nt * TILE_K], bars.index(nt % NUM_STAGES),
                          x_smem.index(nt % NUM_STAGES), pred=nt < n_tiles)
            za, sa, zb, sb = za_next, sa_next, zb_next, sb_next
            k_ahead = gl.minimum(k_lo + (t + 1) * TILE_K, K - TILE_K)  # in bounds; unused after the last
            za_next = gl.load(qzeros_ptr + (k_ahead // GROUP) * N_WORDS + word)
            sa_next = _load_scales(scales_ptr, (k_ahead // GROUP) * N + 8 * w0, W, MMA)
            kb = gl.minimum(k_ahead + _BLOCK_K, K - _BLOCK_K)
            zb_next = gl.load(qzeros_ptr + (kb // GROUP) * N_WORDS + word)
            sb_next = _load_scales(scales_ptr, (kb // GROUP) * N + 8 * w0, W, MMA)

            mbarrier.wait(bars.index(t % NUM_STAGES), (t // NUM_STAGES) & 1)
            w_tile = w_smem.index(t % NUM_STAGES)
            x_tile = x_smem.index(t if ATTN_SPLITS else t % NUM_STAGES)
            acc = _group(acc, w_tile.slice(0, _BLOCK_K), x_tile.slice(0, _BLOCK_K, dim=1), za, sa, zero_shift, ones,
                         DTYPE, W, BLOCK_T, MMA, KSPLIT)
            if HALVES == 2:
                acc = _group(acc, w_tile.slice(_BLOCK_K, _BLOCK_K), x_tile.slice(_BLOCK_K, _BLOCK_K, dim=1), zb, sb,
                             zero_shift, ones, DTYPE, W, BLOCK_T, MMA, KSPLIT)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(i))

        # Back in column order, each thread 8 consecutive columns of a token: the output and the
        # split-K partials move in 16- and 32-byte runs.
        OUT_L: gl.constexpr = _out_layout(W, BLOCK_T)
        out = gl.permute(acc.reshape([4, W, 2, 8, BLOCK_T]), (4, 1, 3, 0, 2)).reshape([BLOCK_T, 64 * W])
        out = gl.convert_layout(out, OUT_L, assert_trivial=True)
        if PARTIALS_ONLY:  # the next kernel sums them
            ot = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, OUT_L))
            oc = pid_n * 64 * W + gl.arange(0, 64 * W, layout=gl.SliceLayout(0, OUT_L))
            gl.store(partial_ptr + pid_s * M * N + ot[:, None] * N + oc[None, :], out,
                     mask=(ot < M)[:, None] & (oc < N)[None, :])
        else:
            _store_split_k(out, out_ptr, partial_ptr, lock_ptr, pid_n, 0, pid_n * 64 * W, M, N, pid_s, split_k, OUT_L,
                           BLOCK_T, OUT_L, FEW_TOKENS=True)
