"""The tensor-core AWQ kernel (engine/kernels/awq_mma.py).

Gluon kernels do not run in Triton's interpreter, so on CPU (CI) the kernel is compiled for
sm_90 with the installed Triton (every layout change in it is asserted to only rename registers,
so a wrong layout fails to compile) and its unpacking PTX runs through a small interpreter of the
three instructions it uses, against the AWQ packing order. On a Hopper GPU the kernel runs
against a float64 reference of the dequantized weight, random data drawn fresh each run."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

import engine.kernels.awq_gemm as awq_kernels
import engine.kernels.awq_mma as mma
from engine.kernels.activation import silu_and_mul, silu_and_mul_partials
from engine.kernels.awq_gemm import awq_linear
from engine.kernels.awq_mma import MMA_MAX_TOKENS, MmaConfig, awq_mma, mma_config
from engine.kernels.counters import ARRIVALS
from engine.kernels.rotary import rope_and_cache, rope_and_cache_partials
from engine.layers.activation import SiluAndMul
from engine.layers.linear import FusedLinear
from engine.layers.norm import RMSNorm
from engine.layers.partials import SplitKPartials
from engine.layers.rotary import RotaryEmbedding
from engine.quantization.awq import AWQConfig, pack_int4
from tests.sm90_compile import sm90_sass
from tests.test_awq_kernels import _check_matmul, _random_weight, _seed

ON_HOPPER = (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
             and torch.cuda.get_device_capability()[0] >= 9)
needs_hopper = pytest.mark.skipif(not ON_HOPPER or not mma.HAVE_GLUON, reason="needs a Hopper GPU and Gluon")


def _f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _halves_f16(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = np.asarray(bits, dtype=np.uint32)
    return (bits & 0xFFFF).astype(np.uint16).view(np.float16), (bits >> 16).astype(np.uint16).view(np.float16)


def _pack_f16(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    lo_bits, hi_bits = (h.astype(np.float16).view(np.uint16).astype(np.uint32) for h in (lo, hi))
    return lo_bits | (hi_bits << 16)


def _bf16_rn(f: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even (no NaNs here)."""
    bits = np.asarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)


def _run_ptx(body: str, regs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the integer, fp32 and packed 16-bit float lines of ``body`` (the instructions the
    AWQ kernels' asm uses) on uint32 arrays."""
    regs = {k: np.asarray(v, dtype=np.uint32) for k, v in regs.items()}

    def value(operand: str) -> np.ndarray:
        return regs[operand] if operand in regs else np.uint32(int(operand, 0))

    for line in body.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        if op == "prmt.b32":  # default mode: selector nibble i picks byte i of d from {b, a}
            a, b, sel = value(args[1]), value(args[2]), value(args[3])
            a, b, sel = np.broadcast_arrays(a, b, sel)
            source = np.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)])
            out = np.zeros(a.shape, dtype=np.uint32)
            for i in range(4):
                s = (sel >> (4 * i)) & 0xF
                byte = np.take_along_axis(source, (s & 7)[None].astype(np.int64), 0)[0]
                byte = np.where(s & 8, np.where(byte & 0x80, np.uint32(0xFF), np.uint32(0)), byte)  # sign replication
                out |= byte.astype(np.uint32) << np.uint32(8 * i)
            regs[args[0]] = out
        elif op == "shr.u32":
            regs[args[0]] = value(args[1]) >> np.uint32(int(args[2], 0))
        elif op == "shl.b32":
            regs[args[0]] = (value(args[1]) << np.uint32(int(args[2], 0))) & np.uint32(0xFFFFFFFF)
        elif op == "and.b32":
            regs[args[0]] = value(args[1]) & value(args[2])
        elif op == "mov.b32":
            regs[args[0]] = value(args[1])
        elif op == "lop3.b32":
            assert int(args[4], 0) == 0xEA, "only (a & b) | c is modelled"
            regs[args[0]] = (value(args[1]) & value(args[2])) | value(args[3])
        elif op == "fma.rn.f32":  # exact in float64 for the values these kernels feed it
            a, b, c = (_f32(value(r)).astype(np.float64) for r in args[1:])
            regs[args[0]] = (a * b + c).astype(np.float32).view(np.uint32)
        elif op == "cvt.rn.bf16x2.f32":  # d = {a -> high half, b -> low half}
            regs[args[0]] = (_bf16_rn(_f32(value(args[1]))) << 16) | _bf16_rn(_f32(value(args[2])))
        elif op in ("sub.rn.f16x2", "mul.rn.f16x2"):
            (alo, ahi), (blo, bhi) = _halves_f16(value(args[1])), _halves_f16(value(args[2]))
            fn = np.subtract if op.startswith("sub") else np.multiply
            regs[args[0]] = _pack_f16(fn(alo, blo), fn(ahi, bhi))
        else:
            raise AssertionError(f"unmodelled instruction {op}")
    return regs


@pytest.mark.parametrize(("ptx", "magic"), [(mma.UNPACK_BF16_PTX, 0x4300), (mma.UNPACK_FP16_PTX, 0x6400)])
def test_unpack_ptx_gives_each_column_pair_in_awq_order(ptx: str, magic: int) -> None:
    """Two packed rows in, eight registers out: register c holds column c of row k (low half)
    and of row k + 1 (high half) as the float MAGIC + q."""
    gen = torch.Generator().manual_seed(_seed())
    pairs = 512
    q = torch.randint(0, 16, (2 * pairs, 8), generator=gen)
    words = pack_int4(q).view(pairs, 2).numpy().view(np.uint32)
    out = _run_ptx(ptx, {"$8": words[:, 0], "$9": words[:, 1]})
    for c in range(8):
        got = out[f"${c}"]
        assert np.array_equal(got & 0xFFFF, magic | q[0::2, c].numpy()), f"column {c}, row k"
        assert np.array_equal(got >> 16, magic | q[1::2, c].numpy()), f"column {c}, row k + 1"


@pytest.mark.parametrize("module", ["engine.kernels.awq_mma", "engine.kernels.awq_wgmma", "engine.kernels.awq_gemm"])
def test_each_awq_kernel_module_imports_first(module: str) -> None:
    """The three AWQ kernel modules import one another; each imports on its own in a fresh
    process (awq_mma first once failed: awq_wgmma read its HAVE_GLUON mid-import)."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_config_rule() -> None:
    """Splits stay within the K tiles; from 5 tokens 256-row stages where K and an even split allow."""
    for m in range(1, MMA_MAX_TOKENS + 1):
        for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (384, 128)]:
            cfg = mma_config(m, n, k, num_sms=132)
            assert 1 <= cfg.split_k <= k // (128 * cfg.halves)
            if cfg.halves == 2:
                assert m > 4 and (k // 256) % cfg.split_k == 0
    picks = {(k, n): mma_config(16, n, k, num_sms=132)[:2] for k, n in [(4096, 6144), (4096, 4096), (14336, 4096)]}
    assert picks == {(4096, 6144): (1, 6), (4096, 4096): (2, 8), (14336, 4096): (2, 8)}
    assert mma_config(1, 4096, 4096, num_sms=132) == (1, 16, 2)  # 32 column blocks fill 132 SMs


def compiled_sass(module: str, kernel: str, block_t: int, descriptor_args: list, consts: dict,
                  dtype: torch.dtype, num_warps: int) -> str:
    """SASS of one of the AWQ Gluon kernels compiled for sm_90 with the installed Triton (in a
    process of its own, tests/sm90_compile.py), asserted free of local memory (register spills)."""
    ptx, sass = sm90_sass(module, kernel, block_t, descriptor_args, consts, dtype, num_warps)
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert not re.search(r"\b(STL|LDL)\b", sass), "register spills"
    return sass


@pytest.mark.skipif(not mma.HAVE_GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize(("block_t", "halves", "dtype", "partials"),
                         [(8, 1, torch.bfloat16, False), (16, 2, torch.float16, False), (8, 1, torch.bfloat16, True)])
def test_kernel_compiles_for_sm90_without_spills(block_t: int, halves: int, dtype: torch.dtype,
                                                 partials: bool) -> None:
    """The kernel compiles for an H100/H200 with this Triton (its layout changes are all asserted
    trivial), keeps its state in registers (no local memory) and feeds the tensor cores from its
    unpacked registers: no shared-memory store in the main loop, 40 mma.sync a 128-row tile."""
    consts = dict(N=256, K=1024, GROUP=128, BLOCK_T=block_t, HALVES=halves, NUM_STAGES=2, PARTIALS_ONLY=partials,
                  USE_PDL=True)
    sass = compiled_sass("engine.kernels.awq_mma", "_awq_mma_kernel", block_t, [128 * halves], consts, dtype,
                         mma.WARPS)
    hmma = len(re.findall(r"HMMA\.16816", sass))
    per_tile = 40 * (2 if block_t == 16 else 1)  # 32 (64 columns x 8 tokens a warp) + 8 for the sums
    assert hmma == per_tile * halves, hmma
    # Nothing is stored to shared memory but the split-K counter's value (a scalar atomic's result,
    # shared with the CTA): the dequantized tile goes from registers to the tensor cores.
    assert len(re.findall(r"\bSTS\b", sass)) <= 1


@pytest.mark.skipif(not mma.HAVE_GLUON, reason="this Triton has no Gluon")
def test_descriptor_prefetched_before_the_wait_is_the_one_loaded_after_it() -> None:
    """The kernel prefetches its first parameter's TMA descriptor before its PDL wait by the name
    Triton gives that parameter in the PTX; the first tensor load after the wait (the activations')
    must read that same descriptor, or the prefetch warms the wrong one."""
    consts = dict(N=256, K=1024, GROUP=128, BLOCK_T=8, HALVES=1, NUM_STAGES=2, PARTIALS_ONLY=False, USE_PDL=True)
    ptx, _ = sm90_sass("engine.kernels.awq_mma", "_awq_mma_kernel", 8, [128], consts, torch.bfloat16, mma.WARPS)
    prefetched = re.findall(r"prefetch\.param\.tensormap \[(\w+)\]", ptx)
    assert len(prefetched) == 1, prefetched
    param = re.escape(prefetched[0])
    assert re.search(rf"\.param \.align 64 \.b8 {param}\[128\]", ptx), "the prefetched parameter is no descriptor"
    # The parameter's address as the loads take it: a mov of the symbol, then (Triton 3.9) a widening
    # cvt, then the cvta to a generic address.
    derived = set(re.findall(rf"mov\.b(?:32|64)\s+(%r\w+), {param};", ptx))
    for _ in range(2):
        derived |= {dst for dst, src in re.findall(r"(?:cvt|cvta)\.\S+\s+(%r\w+), (%r\w+);", ptx) if src in derived}
    after_wait = ptx[ptx.index("griddepcontrol.wait"):]
    first_load = re.search(r"cp\.async\.bulk\.tensor\S* \[%r\d+\], \[(%rd\d+),", after_wait).group(1)
    assert first_load in derived, (first_load, derived)
    assert ptx.index("prefetch.param.tensormap") < ptx.index("griddepcontrol.wait")


@pytest.mark.skipif(not mma.HAVE_GLUON, reason="this Triton has no Gluon")
def test_kernel_combining_decode_splits_reads_them_after_the_wait() -> None:
    """With ``splits`` the kernel compiles for sm_90 without spills, issues the same MMAs a tile,
    and reads before its PDL wait only the request's length (a host copy). The partials, which
    the kernel ahead writes, are read after it."""
    consts = dict(N=256, K=4096, GROUP=128, BLOCK_T=8, HALVES=1, NUM_STAGES=2, USE_PDL=True, ATTN_SPLITS=16,
                  ATTN_SPLITS_P2=16, ATTN_BLOCK_N=32, ATTN_TILES=2)
    ptx, sass = sm90_sass("engine.kernels.awq_mma", "_awq_mma_kernel", 8, [128], consts, torch.bfloat16, mma.WARPS)
    assert not re.search(r"\b(STL|LDL)\b", sass), "register spills"
    assert len(re.findall(r"HMMA\.16816", sass)) == 40
    before_wait = ptx[: ptx.index("griddepcontrol.wait")]
    assert len(re.findall(r"\bld\.global", before_wait)) == 1
    assert "cp.async.bulk.tensor" in before_wait  # the first weight tile, as without splits
    # two heads' 16 partial outputs (8 bytes a thread each) and log-sum-exps
    assert len(re.findall(r"\bld\.global", ptx[len(before_wait):])) >= 2 * 16 * 2


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "k", "n", "group_size", "config"),
    [
        (1, 512, 256, 128, None),
        (3, 512, 384, 128, MmaConfig(1, 1)),  # no split
        (8, 1024, 256, 128, MmaConfig(1, 3)),  # uneven split: 3 programs over 8 K tiles
        (9, 1024, 128, 256, MmaConfig(2, 2)),  # 16-token MMA tiles, 256-row stages, groups of 256
        (16, 768, 256, 128, MmaConfig(2, 3)),
        (5, 384, 128, 384, None),  # one group over all of K, K % 256 != 0
        (2, 512, 256, 128, MmaConfig(1, 4, 3)),  # 3 stages
        (1, 4096, 128, 128, MmaConfig(1, 32)),  # one token's split-K sum, 16 partials at a time, twice
        (4, 4096, 128, 128, MmaConfig(1, 32)),  # 2-4 tokens: the same, their rows alone
    ],
)
def test_mma_matches_float64_reference(m, k, n, group_size, config, dtype) -> None:
    check_kernel(awq_mma, m, k, n, group_size, config, dtype)


def check_kernel(fn, m: int, k: int, n: int, group_size: int, config, dtype: torch.dtype) -> None:
    """``fn(x, qweight, qzeros, scales, config)`` on random data against the float64 reference,
    split-K counters left at zero."""
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(k, n, group_size, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
    _check_matmul(fn(x, qweight, qzeros, scales, config), x, w64, seed)
    assert not ARRIVALS[x.device].any()


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "k", "n", "config"),
    [
        (1, 512, 512, None),
        (2, 512, 768, MmaConfig(1, 1)),  # no split: one partial
        (4, 1024, 256, MmaConfig(1, 3)),  # uneven split
        (7, 1024, 512, MmaConfig(2, 2)),
        (16, 768, 512, None),
        (3, 4096, 512, MmaConfig(1, 32)),
    ],
)
def test_mma_partials_sum_to_the_output(m, k, n, config, dtype) -> None:
    """``return_partials=True``: the split-K partials, which summed in split order and rounded are
    the bits of the kernel's own output; ``silu_and_mul_partials`` of them equals
    ``silu_and_mul`` of that output."""
    seed = _seed()
    qweight, qzeros, scales, _ = _random_weight(k, n, 128, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
    out = awq_mma(x, qweight, qzeros, scales, config)
    partials = awq_mma(x, qweight, qzeros, scales, config, return_partials=True)
    total = torch.zeros(m, n, device="cuda")
    for p in partials:
        total = total + p
    assert torch.equal(total.to(dtype), out), f"seed {seed}"
    assert torch.equal(silu_and_mul_partials(partials, dtype), silu_and_mul(out)), f"seed {seed}"
    assert not ARRIVALS[x.device].any()


@needs_hopper
@pytest.mark.parametrize("window", [0, 150])
def test_mma_combines_decode_attention_splits(window: int) -> None:
    """``splits=``: awq_mma of decode attention's output left as its splits' partials (Llama-3.1-8B's
    o projection shape; one request using every split, a few, one, none) is the float64 product
    of the split reduction's output within rounding, and bit for bit awq_mma of that output; the
    partials of splits without keys (poisoned with NaN here) are never read; and
    ``awq_linear_decode_splits`` leaves two requests to the reduction."""
    from engine.kernels.decode_attention import decode_attention

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, block = 32, 8, 128, 16
    k, n = heads * head_dim, 4096
    qweight, qzeros, scales, w64 = _random_weight(k, n, 128, seed)
    blocks = 5 * 2048 // block
    caches = [torch.randn(blocks, block, kv_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
              for _ in range(2)]
    for lens in ([300], [2048], [7], [1], [0], [900, 33]):
        m = len(lens)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        tables = torch.randperm(blocks, generator=gen)[: m * 128].view(m, 128).to("cuda", torch.int32)
        q = torch.randn(m, heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
        splits = decode_attention(q, *caches, tables, seq_lens, head_dim**-0.5, window or None, max_seq_len=2048,
                                  combine=False)
        num_splits = splits.part_out.shape[2]
        for r, length in enumerate(lens):
            kv_len = min(length, window) if window else length
            split_len = math.ceil(math.ceil(kv_len / num_splits) / splits.block_n) * splits.block_n
            used = math.ceil(kv_len / max(split_len, 1))
            splits.part_out[r, :, used:] = float("nan")
            splits.part_lse[r, :, used:] = float("nan")
        got = awq_kernels.awq_linear_decode_splits(splits, qweight, qzeros, scales)
        x = splits.combine().view(m, k)
        assert torch.isfinite(x).all()
        if m > 1:
            assert got is None
            continue
        _check_matmul(got, x, w64, seed)
        # the reduction's bits (its arithmetic, in its order), so the product's too
        assert torch.equal(got, awq_mma(x, qweight, qzeros, scales)), f"seed {seed}, lengths {lens}"
        assert not ARRIVALS[x.device].any()


def _awq_layer(k: int, sizes: dict, seed: int, bias: bool = False) -> FusedLinear:
    layer = FusedLinear(k, sizes, bias=bias, quantization_config=AWQConfig(group_size=128).to_dict(),
                        prefix="layer").to("cuda", torch.bfloat16)
    qweight, qzeros, scales, _ = _random_weight(k, sum(sizes.values()), 128, seed)
    for name, value in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        getattr(layer, name).data = value
    if bias:
        layer.bias.data = torch.randn_like(layer.bias)
    return layer


@needs_hopper
def test_layer_partials_through_silu_and_mul_and_rope_and_cache() -> None:
    """``forward_normed(partials=True)`` of an AWQ layer gives awq_mma's split-K partials at 1-16
    tokens (a tensor above 16, and with a bias); SiluAndMul of a gate/up layer's partials and
    ``rope_and_cache_partials`` of a q/k/v layer's give the bits of the plain output through
    ``silu_and_mul`` and ``rope_and_cache``; CUDA graph replays give the eager bits."""
    seed = _seed()
    k, d, heads, kv_heads, head_dim = 512, 512, 4, 2, 128
    norm = RMSNorm(k, 1e-6).to("cuda", torch.bfloat16)
    gate_up = _awq_layer(k, {0: d, 1: d}, seed)
    for m, bias in ((1, False), (5, False), (16, False), (17, False), (40, False), (3, True)):
        layer = _awq_layer(k, {0: d, 1: d}, seed, bias=True) if bias else gate_up
        hidden, residual = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
        plain, plain_sum = layer.forward_normed(hidden, residual.clone(), norm)
        got, got_sum = layer.forward_normed(hidden, residual.clone(), norm, partials=True)
        assert isinstance(got, SplitKPartials) == (m <= MMA_MAX_TOKENS and not bias), f"m {m}"
        assert torch.equal(SiluAndMul()(got), silu_and_mul(plain)), f"m {m} seed {seed}"
        assert torch.equal(got_sum, plain_sum)

    qkv_layer = _awq_layer(k, {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}, seed)
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, None).to("cuda")
    for m in (1, 7):
        hidden = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        positions = torch.randint(0, 4096, (m,), device="cuda")
        slots = torch.randperm(64, device="cuda")[:m]
        caches = [torch.zeros(4, 16, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        qkv, _ = qkv_layer.forward_normed(hidden, None, norm)
        q, k_, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.view(m, heads, head_dim)
        rope_and_cache(positions, q, k_.view(m, kv_heads, head_dim), v.view(m, kv_heads, head_dim),
                       rotary.cos_cache, rotary.sin_cache, caches[0], caches[1], slots)
        partials, _ = qkv_layer.forward_normed(hidden, None, norm, partials=True)
        got_q = rope_and_cache_partials(positions, partials.partials, partials.dtype, heads, kv_heads,
                                        rotary.cos_cache, rotary.sin_cache, caches[2], caches[3], slots)
        assert torch.equal(got_q, q) and torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1]), \
            f"m {m} seed {seed}"

    hidden = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    eager = SiluAndMul()(gate_up.forward_normed(hidden, None, norm, partials=True)[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = SiluAndMul()(gate_up.forward_normed(hidden, None, norm, partials=True)[0])
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert not ARRIVALS[hidden.device].any()


def _awq_llama_runner(path, hidden: int, heads: int, attention_backend: str = "triton", **engine_args):
    """A ModelRunner (CUDA, bf16, 64 KV blocks of 16; triton attention unless told) of a two-layer
    Llama-shape AWQ model with random packed weights, written to ``path``."""
    import transformers

    from engine.config import EngineArgs
    from engine.model_config import ModelConfig
    from engine.model_runner import ModelRunner

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=1, head_dim=128, vocab_size=512,
                                      bos_token_id=0, eos_token_id=1)
    config.architectures = ["LlamaForCausalLM"]
    config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                  "version": "gemm"}
    config.save_pretrained(path)
    args = EngineArgs(model=str(path), load_format="dummy", dtype="bfloat16", block_size=16, num_kv_blocks=64,
                      attention_backend=attention_backend, **engine_args)
    runner = ModelRunner(ModelConfig.from_pretrained(path, dtype="bfloat16", device="cuda"), args)
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


@needs_hopper
def test_awq_model_greedy_tokens_the_same_with_partials(tmp_path, monkeypatch) -> None:
    """A Llama-shape AWQ model (random packed weights, bf16, triton attention) decodes three
    requests (steps of 1-3 tokens through awq_mma) to the same greedy tokens whether its gate/up
    and q/k/v projections hand their split-K partials to SiLU-and-mul and rotary + cache write
    (with CUDA graphs) or sum them themselves (``apply_partials`` and ``apply_decode_splits`` off,
    eager)."""
    from engine.layers.linear import LinearMethod
    from engine.quantization.awq import AWQLinearMethod
    from tests.test_model_runner import Driver

    prompts = {"a": [(7 * i) % 500 + 2 for i in range(27)], "b": list(range(2, 9)), "c": [5] * 40}
    outputs = {}
    for partials in (True, False):
        if not partials:
            monkeypatch.setattr(AWQLinearMethod, "apply_partials", LinearMethod.apply_partials)
            monkeypatch.setattr(AWQLinearMethod, "apply_decode_splits", LinearMethod.apply_decode_splits)
        runner = _awq_llama_runner(tmp_path, 256, 2, enforce_eager=not partials, max_num_seqs=8)
        driver = Driver(runner, budget=64, seed=1)
        for rid, prompt in prompts.items():
            driver.add(rid, prompt)
        while any(len(out) < 12 for out in driver.outputs.values()):
            driver.step()
        outputs[partials] = {rid: out[:12] for rid, out in driver.outputs.items()}
    assert outputs[True] == outputs[False]
    assert len({tuple(out) for out in outputs[True].values()}) > 1, "the random model says one thing"


@needs_hopper
@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_awq_lone_request_decode_graph_same_tokens_with_o_combining_splits(tmp_path, monkeypatch, backend) -> None:
    """One request alone decodes, through the one-request CUDA graphs, to the same greedy tokens
    whether its o projection combines decode attention's splits as it loads them or the split
    reduction's kernel runs first (``apply_decode_splits`` off): the two give the same bits. The
    flash_attn backend's one-request decode takes the same split kernel and hands on its splits."""
    from engine.attention import get_attention_backend
    from engine.layers.linear import LinearMethod
    from engine.quantization.awq import AWQLinearMethod
    from tests.test_model_runner import Driver

    if not get_attention_backend(backend).is_available(torch.device("cuda")):
        pytest.skip(f"{backend} is not importable here")
    outputs = []
    for combine_in_o in (True, False):
        if not combine_in_o:
            monkeypatch.setattr(AWQLinearMethod, "apply_decode_splits", LinearMethod.apply_decode_splits)
        runner = _awq_llama_runner(tmp_path, 512, 4, backend, max_num_seqs=4)
        driver = Driver(runner, budget=64, seed=2)
        driver.add("alone", [(11 * i) % 500 + 2 for i in range(30)])
        while len(driver.outputs["alone"]) < 40:
            driver.step()
        outputs.append(driver.outputs["alone"][:40])
    assert outputs[0] == outputs[1]
    assert len(set(outputs[0])) > 1, "the random model says one thing"


@needs_hopper
@pytest.mark.parametrize("m", [1, 12])
def test_mma_reads_activations_tma_cannot(m: int) -> None:
    """Activations at an odd address with an odd row stride (a column slice of a wider tensor)
    reach the kernel through a padded copy."""
    seed = _seed()
    k, n = 512, 256
    qweight, qzeros, scales, w64 = _random_weight(k, n, 128, seed)
    wide = torch.randn(m, k + 3, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
    x = wide[:, 1 : k + 1]
    _check_matmul(awq_mma(x, qweight, qzeros, scales), x, w64, seed)


@needs_hopper
def test_mma_in_a_cuda_graph_and_through_awq_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """awq_linear sends 1-16 tokens here; replays of a captured call match eager calls with
    split-K counters left at zero."""
    called = []
    monkeypatch.setattr(awq_kernels._awq_mma, "awq_mma",
                        lambda *a, f=awq_mma: called.append(len(a[0])) or f(*a))
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(1024, 512, 128, seed)
    for m in (1, 7, 16, 17):
        x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(seed + m)).to("cuda", torch.bfloat16)
        _check_matmul(awq_linear(x, qweight, qzeros, scales), x, w64, seed)
    assert called == [1, 7, 16]
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    eager = awq_mma(x, qweight, qzeros, scales)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = awq_mma(x, qweight, qzeros, scales)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert not ARRIVALS[x.device].any()
