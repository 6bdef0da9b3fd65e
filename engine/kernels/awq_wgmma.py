"""Tensor-core AWQ linear for many tokens on Hopper: ``awq_wgmma`` (a Gluon kernel).

From a few hundred tokens a linear is bound by the tensor cores, not by the weight bytes, and
the path before this kernel (dequantize the whole weight to 16-bit floats, then a dense
``torch.matmul``) paid a full write and read of the dense weight on top of the GEMM. Here the
packed weight is dequantized in registers, laid out as the A operand fragments of ``wgmma``
(Hopper's warpgroup MMA), which reads them there and B, the activations, from shared memory, so
the weight crosses global memory once, in 4 bits.

The product is computed transposed, ``out^T [N, M] = W^T [N, K] x^T [K, M]``: output columns on
the MMA's 64-row M side (a warpgroup each 64 of a program's 128), tokens on its N side (64-256 a
program). A thread's A fragment of a 16-row K slice holds rows r and r + 8 of its warp's 16 at
K rows (2t, 2t + 1) and (2t + 8, 2t + 9). Row r is chosen to be the column that byte r % 4 of a
packed word holds in its low nibble, and row r + 8 the column of the same byte's high nibble,
so that four lanes share a word and each takes one byte: a PRMT of the words at K rows k and
k + 1 puts that byte of both in the two 16-bit halves of a register, one LOP3 (after a shift, for
the high nibble) makes the pair of floats MAGIC + q, and the zero point and scale come off
exactly, in the order awq_dequantize rounds them (``_dequant``): bf16 as fp32
``(128 + q) s - (128 + z) s``, exact, then one rounding; fp16 as ``((1024 + q) - (1024 + z)) * s``
in fp16. The columns are put back in order in the epilogue.

A program is warp-specialized: a producer warp streams the packed weight, its scales and zero
points, and the activations through TMA into a ring of shared-memory stages, and two consumer
warpgroups (64 columns each) dequantize and run their wgmmas, the A operand in registers (their
RS form). PTX forbids redefining registers an unfinished wgmma reads, so a warpgroup waits for
its wgmmas before it dequantizes the next stage; the two warpgroups alternate, one dequantizing
while the other's wgmmas run. Storing the dequantized tile to shared memory for the wgmmas to
read there (their SS form) lets a warpgroup overlap its own wgmmas too, but the tile then
crosses shared memory twice more, and shared memory is what binds this kernel: ncu of that form
at 512 tokens on gate_up read the L1/shared-memory pipe busy 74% of the cycles, with the SMs
active 81% of them (the tensor pipe 62%; bench/results/ncu_awq_wgmma_gate_up_512_s18*.txt).
Once the scales and zero points came through TMA, the SS form was 1.5-5% slower at 256-1024
tokens on an H200 (bench/results/awq_linear_s18_sweep_a_regs.json; it had been 3-8% faster
while they were global loads in the step). A stream-K form (one program an SM over equal runs of all tiles' K
steps, cut tiles summed from fp32 partials, against gate_up's 1.70 waves at 256 tokens) was
built and measured 1.5-1.9x slower than this grid of tiles (awq_linear_s18_sweep.json), and
removed.

Gluon kernels do not run under TRITON_INTERPRET=1: CI compiles this one for sm_90 and runs its
dequantizing PTX through a small PTX interpreter (tests/test_awq_wgmma.py); its numerics are
tested on the GPU against a float64 reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from engine.kernels import awq_mma as _mma
from engine.kernels.awq_gemm import _check_shapes, _num_sms, _tma_rows
from engine.kernels.counters import arrival_counters
from engine.kernels.pdl import pdl_args

# awq_linear runs this kernel for WGMMA_MIN_TOKENS to WGMMA_MAX_TOKENS tokens on weights of at
# least WGMMA_MIN_WEIGHTS entries. On an H200 (bench/results/awq_linear_s18b.json, Llama-3.1-8B
# shapes) it beats both other paths on gate_up (117M weights) and down (59M) from 128 to 1024
# tokens: at 256 tokens 101.4 and 64.3 us against 178.4 and 93.1 for dequantize + matmul, at 1024
# gate_up 382.5 against 409.8; at 64 tokens the fused kernel is about as fast (gate_up 55.3
# against 57.5 us); at 2048 tokens dequantize + matmul is faster on gate_up (790.5 against 823.4).
# Smaller weights take it for SMALL_WEIGHT_TOKENS only, where their column blocks fill at least
# half the SMs in one wave (bench/results/awq_linear_s20*.json: qkv, 25M weights, at 256 tokens 36.3
# against 41.1 us, at 512 49.6 against 54.3; at 1024 its 192 programs take two waves, 100.2
# against 89.6; at 128 tokens the fused kernel is faster on qkv and o).
WGMMA_MIN_TOKENS = 128
WGMMA_MAX_TOKENS = 1024
WGMMA_MIN_WEIGHTS = 1 << 25
SMALL_WEIGHT_TOKENS = (256, 512)
# Split-K runs of 256-token programs are at least MIN_SPLIT_STEPS_256 K steps: their fp32
# partials ([256, 128] a program) cost 5-9 us to store and as much again to sum when the programs
# of one wave finish together (bench/results/awq_wgmma_split_k_parts_s20.json: o at 256 tokens
# with 4 splits 15.6 us of main loops, 24.5 with the partials stored, 34.6 summed). Where 256-token
# programs fill under half the SMs and splitting them that far would leave runs shorter than
# FILL_STEPS_256, 128-token programs take their place.
MIN_SPLIT_STEPS_256 = 32
FILL_STEPS_256 = 48
BLOCK_N = 128  # output columns a program: 64 a warpgroup
BLOCK_K = 64  # K rows a pipeline stage
Z_WORDS = 32  # a stage's zero-point box: 128 bytes, the alignment of a TMA destination
WARPS = 4  # the default partition (one consumer warpgroup); another warpgroup and a producer warp join it

if _mma.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    from triton.runtime.jit import constexpr_function


def _dequant_ptx(dtype: torch.dtype) -> str:
    """Four A registers from one 8-element pack: words $4..$11 (K rows k, k + 1, k, k + 1,
    k + 8, k + 9, k + 8, k + 9), the PRMT selector $12 (byte b of the first word to byte 0, of
    the second to byte 2), and per element the zero-point and scale operands $20.. and $28..
    (elements 0-1 and 4-5 are the low nibble's row, 2-3 and 6-7 the high nibble's). Out: $0
    (low nibble, rows k, k + 1), $1 (high nibble), $2 and $3 the same for k + 8, k + 9.

    bf16: $20 = s and $28 = -(128 + z) s as fp32 bits; 128 + q as fp32 is the bf16 pair's half
    shifted into the top 16 bits, (128 + q) s + $28 = (q - z) s exactly (every product has at most
    19 significant bits), and one cvt.rn rounds the pair. fp16: $20 = (s, s) and $28 = (1024 + z,
    1024 + z) as fp16 pairs; (1024 + q) - (1024 + z) is exact, times s rounds once."""
    lines = ["{", ".reg .b32 p, r, lo, hi;", ".reg .f32 f0, f1, s0, s1, z0, z1;"]
    if dtype == torch.bfloat16:
        lines += ["mov.b32 s0, $20;", "mov.b32 s1, $22;", "mov.b32 z0, $28;", "mov.b32 z1, $30;"]
    for out, (w0, w1) in ((0, (4, 5)), (2, (8, 9))):
        lines.append(f"prmt.b32 p, ${w0}, ${w1}, $12;")
        for nibble in (0, 1):
            if nibble:
                lines.append("shr.u32 p, p, 4;")
            dst, row = f"${out + nibble}", nibble
            if dtype == torch.bfloat16:
                lines += ["lop3.b32 r, p, 0x000F000F, 0x43004300, 0xEA;",
                          "shl.b32 lo, r, 16;", "and.b32 hi, r, 0xFFFF0000;",
                          "mov.b32 f0, lo;", "mov.b32 f1, hi;",
                          f"fma.rn.f32 f0, f0, s{row}, z{row};", f"fma.rn.f32 f1, f1, s{row}, z{row};",
                          f"cvt.rn.bf16x2.f32 {dst}, f1, f0;"]
            else:
                lines += ["lop3.b32 r, p, 0x000F000F, 0x64006400, 0xEA;",
                          f"sub.rn.f16x2 r, r, ${28 + 2 * row};", f"mul.rn.f16x2 {dst}, r, ${20 + 2 * row};"]
    return "\n".join(lines + ["}"])


DEQUANT_BF16_PTX = _dequant_ptx(torch.bfloat16)
DEQUANT_FP16_PTX = _dequant_ptx(torch.float16)


class WgmmaConfig(NamedTuple):
    block_t: int  # tokens a program (the MMA's N): 64, 128 or 256
    split_k: int  # programs along K
    num_stages: int = 4


def wgmma_config(m: int, n: int, k: int, num_sms: int) -> WgmmaConfig:
    """The tiling, from ``bench/bench_awq_linear.py --wgmma-sweep`` on an H200
    (bench/results/awq_linear_s17_sweep*.json, awq_linear_s18_sweep*.json, awq_linear_s20*.json):
    programs of 256 tokens above 128 (64 or 128 below), split-K up to about one program per SM
    (down at 256 tokens: 4 splits, 63.7 us, against 68.4 with 128-token programs and 2), 4 stages
    for 256-token programs (5 were 0-13% slower in session 20, qkv at 1024 tokens 115.4 against
    100.2 us) and 6 for smaller ones (7: no faster). 256-token programs split K only in runs of
    MIN_SPLIT_STEPS_256 steps or more; where filling half the SMs with them would take runs
    shorter than FILL_STEPS_256, 128-token programs instead (o at 256 tokens: 27.5 us with 2
    splits of them, against 34.9 for 256-token programs and 4; qkv 36.3 against 43.1)."""
    blocks_n, steps = n // BLOCK_N, k // BLOCK_K
    block_t = 64 if m <= 64 else 128 if m <= 128 else 256
    if block_t == 256:
        programs = blocks_n * triton.cdiv(m, 256)
        if 2 * programs < num_sms and steps // triton.cdiv(num_sms, 2 * programs) < FILL_STEPS_256:
            block_t = 128
    programs = blocks_n * triton.cdiv(m, block_t)
    split_k = max(1, min(steps // (MIN_SPLIT_STEPS_256 if block_t == 256 else 4), num_sms // programs))
    return WgmmaConfig(block_t, split_k, 4 if block_t == 256 else 6)


def wgmma_preferred(m: int, n: int, k: int, num_sms: int) -> bool:
    """Whether awq_linear should take this kernel for m tokens of a [K, N] weight (see
    WGMMA_MIN_TOKENS): a smaller weight only when its grid fills at least half the SMs."""
    if n * k >= WGMMA_MIN_WEIGHTS:
        return WGMMA_MIN_TOKENS <= m <= WGMMA_MAX_TOKENS
    if not SMALL_WEIGHT_TOKENS[0] <= m <= SMALL_WEIGHT_TOKENS[1] or n % BLOCK_N or k % BLOCK_K:
        return False
    cfg = wgmma_config(m, n, k, num_sms)
    return 2 * (n // BLOCK_N) * triton.cdiv(m, cfg.block_t) * cfg.split_k >= num_sms


@functools.cache
def _hopper(device: torch.device) -> bool:
    """awq_mma's conditions (Gluon, not turned off) on a compute capability 9 GPU: decided once per device."""
    return _mma._enabled(device) and torch.cuda.get_device_capability(device)[0] == 9


def wgmma_supported(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Whether ``awq_wgmma`` takes these activations and weight: a Hopper GPU (wgmma is sm_90's)
    with Gluon, fp16 or bf16 activations, N % 128 == 0, K % 64 == 0 and groups of a multiple of 64
    rows (or one over all of K)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _hopper(x.device)
            and n % BLOCK_N == 0 and k % BLOCK_K == 0 and (group_size % BLOCK_K == 0 or group_size == k))


def _descriptors(x: torch.Tensor, qweight: torch.Tensor, block_t: int):
    """TMA descriptors: activations in [block_t, 64] boxes (128-byte rows, 128-byte swizzle, the
    wgmma B layout), the packed weight in [64, 8] words (32-byte rows, 32-byte swizzle: a warp's
    word reads are conflict-free)."""
    gl_dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = GluonTensorDescriptor.from_tensor(
        _tma_rows(x), [block_t, BLOCK_K], gl.NVMMASharedLayout.get_default_for([block_t, BLOCK_K], gl_dtype))
    w_desc = GluonTensorDescriptor.from_tensor(
        qweight, [BLOCK_K, 8], gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=32, rank=2))
    return x_desc, w_desc


def _param_descriptors(scales: torch.Tensor, qzeros: torch.Tensor):
    """TMA descriptors of a program's scales [1, 128] and zero-point words of one group
    (unswizzled: the consumers read them in their own layout). The zero-point box is 32 words,
    of which the program uses the first 16: a TMA destination must be 128-byte aligned, and each
    stage's box starts where the last one ends."""
    s_desc = GluonTensorDescriptor.from_tensor(
        scales, [1, BLOCK_N], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2))
    z_desc = GluonTensorDescriptor.from_tensor(
        qzeros, [1, Z_WORDS], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))
    return s_desc, z_desc


def awq_wgmma(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              config: WgmmaConfig | None = None) -> torch.Tensor:
    """``x`` [M, K] (fp16 or bf16) times the AWQ weight -> [M, N] in x's dtype, dequantized into
    the tensor cores' registers (see the module docstring). Needs ``wgmma_supported``; ``config``
    overrides ``wgmma_config``."""
    m, k_x = x.shape
    k, n, group_size = _check_shapes(qweight, qzeros, scales)
    assert k_x == k, f"x has {k_x} features, the weight {k}"
    assert wgmma_supported(x, qweight, group_size), "awq_wgmma does not take this device, dtype or shape"
    cfg = WgmmaConfig(*config) if config else wgmma_config(m, n, k, _num_sms(x.device))
    assert cfg.block_t in (64, 128, 256) and cfg.num_stages >= 2  # a stage loads while the last one is used
    blocks_t, blocks_n = triton.cdiv(m, cfg.block_t), n // BLOCK_N
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(k // BLOCK_K, cfg.split_k) * BLOCK_K
    split_k = triton.cdiv(k, k_per_split)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    x_desc, w_desc = _descriptors(x, qweight, cfg.block_t)
    s_desc, z_desc = _param_descriptors(scales, qzeros)
    _awq_wgmma_kernel[(blocks_t, blocks_n, split_k)](
        x_desc, w_desc, s_desc, z_desc, out, partial, arrival_counters(x.device, 2 * blocks_t * blocks_n),
        m, k_per_split, split_k,
        N=n, K=k, GROUP=group_size, BLOCK_T=cfg.block_t, NUM_STAGES=cfg.num_stages,
        num_warps=WARPS, **pdl_args(x.device),
    )
    return out


if _mma.HAVE_GLUON:
    _DEQUANT_BF16 = gl.constexpr(DEQUANT_BF16_PTX)
    _DEQUANT_FP16 = gl.constexpr(DEQUANT_FP16_PTX)
    _DEQUANT_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 32))
    _BLOCK_K = gl.constexpr(BLOCK_K)
    _Z_WORDS = gl.constexpr(Z_WORDS)

    @constexpr_function
    def _acc_layout(block_t):
        """A warpgroup's accumulator [64 columns, block_t tokens]."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_t, 16])

    @constexpr_function
    def _unpack_layout(rows):
        """[4 warps, 2 (nibble), 2 (word in the warp), 4 (byte), rows k]: the A operand's
        registers (K pair, nibble, then K rows 8, 16, 32) and lanes (K rows 2 and 4, then the
        byte and the word) with each 8-register pack one call of the asm."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 0, 1], [0, 1, 0, 0, 0]] + [[0, 0, 0, 0, r] for r in (8, 16, 32) if r < rows],
            lane_bases=[[0, 0, 0, 0, 2], [0, 0, 0, 0, 4], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 1, 0, 0]],
            warp_bases=[[1, 0, 0, 0, 0], [2, 0, 0, 0, 0]], block_bases=[], shape=[4, 2, 2, 4, rows])

    @constexpr_function
    def _words_layout(rows):
        """A warpgroup's packed words [rows k, 8] as its threads read them from shared memory: a
        warp's two words of each K row, the four lanes of a byte reading the same word."""
        return gl.DistributedLinearLayout(
            reg_bases=[[1, 0]] + [[r, 0] for r in (8, 16, 32) if r < rows],
            lane_bases=[[2, 0], [4, 0], [0, 0], [0, 0], [0, 1]],
            warp_bases=[[0, 2], [0, 4]], block_bases=[], shape=[rows, 8])

    @gluon.jit
    def _per_row(v, rows: gl.constexpr):
        """[64] in the accumulator's row layout -> [4, 2, 2, 4, rows] in the unpack layout,
        each value repeated along K (register copies only)."""
        L5: gl.constexpr = _unpack_layout(rows)
        v = gl.convert_layout(v.reshape([4, 2, 2, 4]), gl.SliceLayout(4, L5), assert_trivial=True)
        return gl.expand_dims(v, 4).broadcast_to([4, 2, 2, 4, rows])

    @gluon.jit
    def _dequant(words, sel, s_arg, z_arg, DTYPE: gl.constexpr, A_L: gl.constexpr):
        """words [BLOCK_K, 8] -> the A operand [64, BLOCK_K]: row r = 16 w + 8 h + 4 j + b of
        warp w is nibble h of byte b of the warp's word j (see the module docstring)."""
        L5: gl.constexpr = _unpack_layout(_BLOCK_K)
        w = gl.permute(words, (1, 0)).reshape([4, 2, _BLOCK_K])
        w = gl.convert_layout(w, gl.SliceLayout(1, gl.SliceLayout(3, L5)), assert_trivial=True)
        w5 = gl.expand_dims(gl.expand_dims(w, 1), 3).broadcast_to([4, 2, 2, 4, _BLOCK_K])
        # Not pure: the compiler keeps the asm where it is written, after the stage's wait.
        if DTYPE == gl.bfloat16:
            q = gl.inline_asm_elementwise(_DEQUANT_BF16, _DEQUANT_CONSTRAINTS, [w5, sel, s_arg, z_arg],
                                          dtype=gl.bfloat16, is_pure=False, pack=8)
        else:
            q = gl.inline_asm_elementwise(_DEQUANT_FP16, _DEQUANT_CONSTRAINTS, [w5, sel, s_arg, z_arg],
                                          dtype=gl.float16, is_pure=False, pack=8)
        return gl.convert_layout(q.reshape([64, _BLOCK_K]), A_L, assert_trivial=True)

    @constexpr_function
    def _param_layout(rank):
        """The layout in which a warpgroup reads its 64 columns' scales from a stage ([1, 64],
        rank 2) or their 8 zero-point words ([1, 8, 8], rank 3: word, column in the word): column
        c = 8 i + cw goes to the threads that hold accumulator row r (see ``_consumer``), whose bits
        are c0 = r1 (lane bit 3), c1 = r3 (the register), c2 = r0 (lane bit 2), c3 = r2 (lane bit 4),
        c4 = r4 and c5 = r5 (the warps); lane bits 0-1 repeat."""
        if rank == 2:
            return gl.DistributedLinearLayout(
                reg_bases=[[0, 2]], lane_bases=[[0, 0], [0, 0], [0, 4], [0, 1], [0, 8]],
                warp_bases=[[0, 16], [0, 32]], block_bases=[], shape=[1, 64])
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 2]], lane_bases=[[0, 0, 0], [0, 0, 0], [0, 0, 4], [0, 0, 1], [0, 1, 0]],
            warp_bases=[[0, 2, 0], [0, 4, 0]], block_bases=[], shape=[1, 8, 8])

    @gluon.jit
    def _columns_to_rows(v, ROW_L: gl.constexpr):
        """[1, 64] in ``_param_layout(2)``, indexed by column -> [64] indexed by accumulator row,
        in ROW_L (a register renaming, asserted)."""
        rows = gl.permute(v.reshape([2, 2, 2, 2, 2, 2]), (0, 1, 4, 2, 5, 3)).reshape([64])
        return gl.convert_layout(rows, ROW_L, assert_trivial=True)

    @gluon.jit
    def _stage_params(s_tile, z_tile, DTYPE: gl.constexpr, ROW_L: gl.constexpr):
        """The asm's scale and zero-point operands of each accumulator row (layout ROW_L) from a
        stage's scales [1, 64] and zero-point words [1, 8] of the warpgroup's columns in shared
        memory."""
        L2: gl.constexpr = _param_layout(2)
        L3: gl.constexpr = _param_layout(3)
        scales = s_tile.load(L2)
        z_words = gl.expand_dims(z_tile.load(gl.SliceLayout(2, L3)), 2).broadcast_to([1, 8, 8]).reshape([1, 64])
        z_words = gl.convert_layout(z_words, L2, assert_trivial=True)
        cw = gl.arange(0, 64, layout=gl.SliceLayout(0, L2)) % 8
        shifts = 4 * (cw // 2 + 4 * (cw % 2))  # AWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7
        s_arg, z_arg = _tile_args(scales, z_words, shifts[None, :], DTYPE)
        return _columns_to_rows(s_arg, ROW_L), _columns_to_rows(z_arg, ROW_L)

    @gluon.jit
    def _tile_args(s, z_words, shifts, DTYPE: gl.constexpr):
        """The asm's scale and zero-point operands from scales and their packed zero-point words,
        elementwise."""
        z = (z_words >> shifts) & 0xF
        if DTYPE == gl.bfloat16:
            sf = s.to(gl.float32)
            return sf.to(gl.int32, bitcast=True), (-(z.to(gl.float32) + 128.0) * sf).to(gl.int32, bitcast=True)
        else:
            s_bits = s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            return s_bits * 0x10001, (0x6400 + z) * 0x10001

    @gluon.jit
    def _step(t, acc, x_smem, w_smem, s_smem, z_smem, ready, empty, sel, WG: gl.constexpr,
              NUM_STAGES: gl.constexpr):
        """One K tile of consumer warpgroup WG: wait for the stage, dequantize its words with the
        scales and zero points that came with it into the A registers, run the wgmmas on them,
        wait for them (PTX forbids redefining registers an unfinished wgmma reads) and release
        the stage. t counts the program's steps (ring slots and phases)."""
        DTYPE: gl.constexpr = x_smem.dtype
        BLOCK_T: gl.constexpr = x_smem.shape[1]
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_acc_layout(BLOCK_T), k_width=2)
        slot = t % NUM_STAGES
        mbarrier.wait(ready.index(slot), (t // NUM_STAGES) & 1)
        s_arg, z_arg = _stage_params(s_smem.index(slot).slice(64 * WG, 64, dim=1),
                                     z_smem.index(slot).slice(8 * WG, 8, dim=1), DTYPE,
                                     gl.SliceLayout(1, _acc_layout(BLOCK_T)))
        a = _dequant(w_smem.index(2 * slot + WG).load(_words_layout(_BLOCK_K)), sel, _per_row(s_arg, _BLOCK_K),
                     _per_row(z_arg, _BLOCK_K), DTYPE, A_L)
        pending = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[pending])
        mbarrier.arrive(empty.index(slot), count=1)
        return acc

    @constexpr_function
    def _out_layout():
        """A warpgroup's output tile [tokens, 64 columns]: 8 consecutive columns a thread."""
        return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])

    @gluon.jit
    def _consumer(WG: gl.constexpr, x_smem, w_smem, s_smem, z_smem, ready, empty, out_ptr, partial_ptr, lock_ptr, M,
                  pid_t, pid_n, pid_s, n_tiles, split_k, N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  USE_PDL: gl.constexpr):
        """Warpgroup WG: output columns 128 pid_n + 64 WG .. + 63 of the program's tile, over its
        n_tiles K steps (n_tiles >= 1)."""
        BLOCK_T: gl.constexpr = x_smem.shape[1]
        ACC: gl.constexpr = _acc_layout(BLOCK_T)
        OUT_L: gl.constexpr = _out_layout()
        if USE_PDL:
            _mma._pdl_wait()  # before this program's first store
        # Row r of the A tile: warp r // 16, nibble h = (r // 8) % 2 of byte b = r % 4 of the
        # warp's word j = (r // 4) % 2 (see the module docstring).
        b = gl.arange(0, 64, layout=gl.SliceLayout(1, ACC)) % 4
        sel = _per_row(b | ((4 + b) << 8), _BLOCK_K)
        acc = gl.zeros([64, BLOCK_T], gl.float32, layout=ACC)
        step = 0  # (an assigned name, so a loop may carry it)
        # A loop that always runs: in the shared-memory form a zero-trip exit made LLVM copy the
        # accumulator ahead of the final wait, and ptxas then serialized every wgmma (C7514/C7515).
        more = True
        while more:
            acc = _step(step, acc, x_smem, w_smem, s_smem, z_smem, ready, empty, sel, WG, NUM_STAGES)
            step += 1
            more = step < n_tiles
        # Rows back to column order (row bits w, h, j, b1, b0 -> column bits w, j, b0, h, b1),
        # transposed to [tokens, columns].
        out = gl.permute(acc.reshape([4, 2, 2, 2, 2, BLOCK_T]), (5, 0, 2, 4, 1, 3)).reshape([BLOCK_T, 64])
        out = gl.convert_layout(out, OUT_L)
        _mma._store_split_k(out, out_ptr, partial_ptr, lock_ptr, 2 * (pid_t * (N // 128) + pid_n) + WG,
                            pid_t * BLOCK_T, pid_n * 128 + 64 * WG, M, N, pid_s, split_k, OUT_L, 64, OUT_L)

    @gluon.jit
    def _producer(x_desc, w_desc, s_desc, z_desc, x_smem, w_smem, s_smem, z_smem, ready, empty, pid_t, pid_n, k_lo,
                  n_tiles, GROUP, NUM_STAGES: gl.constexpr, USE_PDL: gl.constexpr):
        """One warp: the TMA loads of the program's n_tiles stages (K rows k_lo ..): the weight's
        two 8-word halves, the activations, and the group's 128 scales and 32 zero-point words
        (16 used), each once both warpgroups have released the slot."""
        BLOCK_T: gl.constexpr = x_smem.shape[1]
        STAGE_BYTES: gl.constexpr = _BLOCK_K * 16 * 4 + BLOCK_T * _BLOCK_K * 2 + 128 * 2 + _Z_WORDS * 4
        if USE_PDL:
            _mma._pdl_wait()
        t0, w0 = pid_t * BLOCK_T, pid_n * 16
        for t in range(n_tiles):
            slot = t % NUM_STAGES
            mbarrier.wait(empty.index(slot), ((t // NUM_STAGES) & 1) ^ 1, pred=t >= NUM_STAGES)
            mbarrier.expect(ready.index(slot), STAGE_BYTES)
            k = k_lo + t * _BLOCK_K
            _mma._tma_load(w_desc, [k, w0], ready.index(slot), w_smem.index(2 * slot))
            _mma._tma_load(w_desc, [k, w0 + 8], ready.index(slot), w_smem.index(2 * slot + 1))
            _mma._tma_load(x_desc, [t0, k], ready.index(slot), x_smem.index(slot))
            _mma._tma_load(s_desc, [k // GROUP, 8 * w0], ready.index(slot), s_smem.index(slot))
            _mma._tma_load(z_desc, [k // GROUP, w0], ready.index(slot), z_smem.index(slot))

    # M and split_k stay runtime values even when 1: Triton 3.6 fails to lower this warp-specialized
    # kernel with split_k a constant.
    @gluon.jit(do_not_specialize=["M", "split_k"])
    def _awq_wgmma_kernel(x_desc, w_desc, s_desc, z_desc, out_ptr, partial_ptr, lock_ptr, M, k_per_split, split_k,
                          N: gl.constexpr, K: gl.constexpr, GROUP: gl.constexpr, BLOCK_T: gl.constexpr,
                          NUM_STAGES: gl.constexpr, USE_PDL: gl.constexpr = False):
        """Grid ``(cdiv(M, BLOCK_T), N / 128, split_k)``, warp-specialized: two consumer
        warpgroups (the default partition and a 4-warp worker) and a 1-warp TMA producer.
        Program (t, p, s) owns tokens BLOCK_T t .. (rows past M are read as 0 and not stored),
        output columns 128 p .. 128 p + 127 (warpgroup g the 64 from 128 p + 64 g) and K rows
        s * k_per_split ..; K % 64 == 0 and a 64-row tile lies in one group. Token blocks vary
        fastest, so the programs that share a weight block run together and it is read once.

        Pipeline: NUM_STAGES slots, each the packed weight [64, 2 x 8 words], the activations
        [BLOCK_T, 64] and the group's scales [1, 128] and zero-point words, filled by the producer
        (``ready``) and released by both warpgroups (``empty``, two arrivals); no CTA-wide barrier
        in the loop, so one warpgroup dequantizes while the other's wgmmas run. A consumer step
        (``_step``) dequantizes its 64 columns of the stage into the A registers and runs 4
        wgmma.m64nBLOCK_Tk16 on them. No global load in a step: loading the scales and zero points
        from global memory a step ahead instead was 4-9% slower on an H200
        (bench/results/awq_linear_s18_sweep.json).

        With split_k > 1 each warpgroup stores fp32 partials and the last to arrive for its
        [BLOCK_T, 64] block (counter ``lock_ptr``, reset by it) sums them in order: deterministic."""
        pid_t = gl.program_id(0)
        pid_n = gl.program_id(1)
        pid_s = gl.program_id(2)
        k_lo = pid_s * k_per_split
        n_tiles = (gl.minimum(k_lo + k_per_split, K) - k_lo) // _BLOCK_K

        w_smem = gl.allocate_shared_memory(gl.int32, [2 * NUM_STAGES, _BLOCK_K, 8], w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES, BLOCK_T, _BLOCK_K], x_desc.layout)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [NUM_STAGES, 1, 128], s_desc.layout)
        z_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, 1, _Z_WORDS], z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        fence_async_shared()
        # (Constants reach the partitions as runtime values, except those in a tuple literal of
        # constants, as WG is; a tuple held in a variable loses them too.)
        consumer_args = (x_smem, w_smem, s_smem, z_smem, ready, empty, out_ptr, partial_ptr, lock_ptr, M, pid_t,
                         pid_n, pid_s, n_tiles, split_k, N, NUM_STAGES, USE_PDL)
        gl.warp_specialize(
            [(_consumer, (gl.constexpr(0),) + consumer_args),
             (_consumer, (gl.constexpr(1),) + consumer_args),
             (_producer, (x_desc, w_desc, s_desc, z_desc, x_smem, w_smem, s_smem, z_smem, ready, empty, pid_t, pid_n,
                          k_lo, n_tiles, GROUP, NUM_STAGES, USE_PDL))],
            [4, 1], [232, 24])
