"""The wgmma AWQ kernel for many tokens (engine/kernels/awq_wgmma.py).

As with awq_mma: on CPU (CI) the kernel is compiled for sm_90 with the installed Triton (its
register layout changes are asserted trivial, so a wrong layout fails to compile) and its
dequantizing PTX runs through a small PTX interpreter against the AWQ packing order and the
rounding awq_dequantize does; on a Hopper GPU it runs against a float64 reference of the
dequantized weight, random data drawn fresh each run."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import engine.kernels.awq_gemm as awq_kernels
import engine.kernels.awq_mma as mma
import engine.kernels.awq_wgmma as wg
from engine.kernels.awq_gemm import awq_linear
from engine.kernels.awq_wgmma import (
    FILL_STEPS_256,
    MIN_SPLIT_STEPS_256,
    WGMMA_MIN_TOKENS,
    WgmmaConfig,
    awq_wgmma,
    wgmma_config,
    wgmma_preferred,
)
from engine.kernels.counters import ARRIVALS
from engine.quantization.awq import pack_int4
from tests.test_awq_kernels import _check_matmul, _random_weight, _seed
from tests.test_awq_mma import _bf16_rn, _run_ptx, check_kernel, compiled_sass

ON_HOPPER = (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
             and torch.cuda.get_device_capability()[0] == 9)
needs_hopper = pytest.mark.skipif(not ON_HOPPER or not mma.HAVE_GLUON, reason="needs a Hopper GPU and Gluon")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_ptx_gives_each_threads_rows_exactly(dtype: torch.dtype) -> None:
    """One 8-element pack: the words of K rows k, k + 1, k + 8, k + 9, a byte b; out come the A
    registers (rows k, k + 1 in the low and high half) of the low nibble's column and the high
    nibble's, as (q - z) s rounded once to the activation dtype, like awq_dequantize."""
    gen = torch.Generator().manual_seed(_seed())
    lanes = 4096
    q = torch.randint(0, 16, (4 * lanes, 8), generator=gen)  # rows k, k + 1, k + 8, k + 9 of each lane
    words = pack_int4(q).view(lanes, 4).numpy().view(np.uint32)
    b = torch.randint(0, 4, (lanes,), generator=gen)
    z = torch.randint(0, 16, (lanes, 2), generator=gen)  # the zero point of each nibble's column
    s = (torch.rand(lanes, 2, generator=gen) * 0.1 + 1e-3).half()
    if dtype == torch.bfloat16:
        s_arg = s.float().numpy().view(np.uint32)
        z_arg = (-(z.float() + 128) * s.float()).numpy().view(np.uint32)
    else:
        s_bits = s.numpy().view(np.uint16).astype(np.uint32)
        s_arg, z_arg = s_bits * 0x10001, (0x6400 + z.numpy().astype(np.uint32)) * 0x10001
    regs = {f"${4 + i}": words[:, i % 2 + 2 * (i // 4)] for i in range(8)}  # k, k+1, k, k+1, k+8, k+9, ...
    regs |= {f"${12 + i}": (b.numpy() | ((4 + b.numpy()) << 8)).astype(np.uint32) for i in range(8)}
    regs |= {f"${20 + i}": s_arg[:, (i // 2) % 2] for i in range(8)}
    regs |= {f"${28 + i}": z_arg[:, (i // 2) % 2] for i in range(8)}
    out = _run_ptx(wg._dequant_ptx(dtype), regs)
    idx = torch.arange(lanes)
    for reg, (row_lo, nibble) in {0: (0, 0), 1: (0, 1), 2: (2, 0), 3: (2, 1)}.items():
        col = 4 * (b % 2) + 2 * nibble + b // 2  # the column nibble 2b + h of a word holds
        for half, row in ((0, row_lo), (1, row_lo + 1)):
            w = (q[4 * idx + row, col] - z[:, nibble]).float() * s[:, nibble].float()
            want = _bf16_rn(w.numpy()) if dtype == torch.bfloat16 else w.half().numpy().view(np.uint16)
            got = (out[f"${reg}"] >> (16 * half)) & 0xFFFF
            assert np.array_equal(got, want), f"register {reg}, half {half}"


def test_config_rule_and_routing() -> None:
    """256-token programs above 128 tokens unless they would fill under half the SMs with K too
    short to split them in runs of FILL_STEPS_256, split-K up to about one program per SM (for
    256-token programs in runs of MIN_SPLIT_STEPS_256 steps); awq_linear takes the kernel for
    128-1024 tokens on the large weights and SMALL_WEIGHT_TOKENS on the others where their grid
    fills half the SMs."""
    for m in (17, 64, 100, 128, 256, 512, 2048, 8192):
        for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (512, 128)]:
            cfg = wgmma_config(m, n, k, num_sms=132)
            assert cfg.block_t == (64 if m <= 64 else 128 if m <= 128 else cfg.block_t)
            assert cfg.num_stages == (4 if cfg.block_t == 256 else 6)
            assert 1 <= cfg.split_k <= k // 256
            assert cfg.split_k == 1 or (n // 128) * -(-m // cfg.block_t) * cfg.split_k <= 132
            if cfg.block_t == 256:
                assert cfg.split_k == 1 or k // 64 // cfg.split_k >= MIN_SPLIT_STEPS_256
            elif m > 128:  # 256-token programs: under half the SMs, and K too short to split them
                programs = (n // 128) * -(-m // 256)
                assert 2 * programs < 132 and k // 64 // -(-132 // (2 * programs)) < FILL_STEPS_256
    assert wgmma_config(256, 4096, 14336, num_sms=132) == WgmmaConfig(256, 4, 4)  # down: 32 column blocks
    assert wgmma_config(256, 4096, 4096, num_sms=132) == WgmmaConfig(128, 2, 6)  # o
    assert wgmma_config(256, 6144, 4096, num_sms=132) == WgmmaConfig(128, 1, 6)  # qkv
    assert wgmma_config(512, 6144, 4096, num_sms=132) == WgmmaConfig(256, 1, 4)
    assert wgmma_config(2048, 28672, 4096, num_sms=132) == WgmmaConfig(256, 1, 4)
    gate_up, down, qkv, o = (28672, 4096), (4096, 14336), (6144, 4096), (4096, 4096)
    assert [wgmma_preferred(m, *gate_up, 132) for m in (64, 128, 512, 1024, 2048)] == [False, True, True, True, False]
    assert wgmma_preferred(128, *down, 132) and wgmma_preferred(1024, *down, 132)
    for shape in (qkv, o):
        assert [wgmma_preferred(m, *shape, 132) for m in (128, 255, 256, 512, 513, 1024)] == [
            False, False, True, True, False, False]
    # A small weight whose grid fills under half the SMs keeps dequantize + matmul: 8 column blocks,
    # 128-token programs with 4 splits at 256 tokens (64 programs).
    assert wgmma_config(256, 1024, 1024, num_sms=132) == WgmmaConfig(128, 4, 6)
    assert not wgmma_preferred(256, 1024, 1024, 132) and wgmma_preferred(256, 1024, 1024, 100)


@pytest.mark.skipif(not mma.HAVE_GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize(("block_t", "dtype"), [(256, torch.bfloat16), (128, torch.float16)])
def test_kernel_compiles_for_sm90_pipelined(block_t: int, dtype: torch.dtype) -> None:
    """The warp-specialized kernel compiles for an H100/H200 with this Triton, keeps its state in
    registers (no spills), and runs 4 wgmmas a 64-row stage in each consumer warpgroup (m64 x
    BLOCK_T x k16, the dequantized A operand from registers, not stored to shared memory),
    issued as one group and waited for once: ptxas did not serialize them. The scales and zero
    points come with each stage's TMA loads (5 a stage), and a consumer step loads nothing from
    global memory (the layout changes for them are asserted register renamings)."""
    consts = dict(N=256, K=1024, GROUP=128, BLOCK_T=block_t, NUM_STAGES=4, USE_PDL=True)
    sass = compiled_sass("engine.kernels.awq_wgmma", "_awq_wgmma_kernel", block_t, [], consts, dtype, wg.WARPS)
    kind = r"\.BF16" if dtype == torch.bfloat16 else ""  # fp16 inputs carry no suffix
    wgmma = re.findall(rf"HGMMA\.64x{block_t}x16\.F32{kind} R\d+, R\d+, gdesc", sass)  # A from registers
    assert len(wgmma) == 8, sass.count("HGMMA")  # 4 in each consumer warpgroup
    assert len(re.findall(r"HGMMA.*gsb0", sass)) == 2  # one commit group a step
    assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0", sass)) == 2  # one wait a step
    assert not re.search(r"\b(STSM|STL|LDL)\b", sass)
    assert len(re.findall(r"\bUTMALDG\b", sass)) == 5
    lines = sass.splitlines()
    for end in (i for i, line in enumerate(lines) if "WARPGROUP.DEPBAR.LE gsb0" in line):
        start = max(i for i in range(end) if "TRYWAIT" in lines[i])  # the wait for the stage
        assert not any(re.search(r"\b(LDG|STS)\b", line) for line in lines[start:end])


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "k", "n", "group_size", "config"),
    [
        (17, 512, 256, 128, None),
        (100, 1024, 384, 128, WgmmaConfig(128, 1)),  # a partial token block
        (300, 1024, 256, 64, WgmmaConfig(256, 2)),  # groups of 64, two splits
        (64, 768, 128, 768, WgmmaConfig(64, 3, 3)),  # one group over all of K, uneven split, 3 stages
        (513, 512, 256, 128, WgmmaConfig(128, 4)),
        (300, 1024, 256, 128, WgmmaConfig(256, 2, 3)),
        (100, 768, 384, 768, WgmmaConfig(128, 1, 2)),  # 2 stages
        (17, 512, 256, 128, WgmmaConfig(64, 1, 6)),
        (100, 768, 384, 768, WgmmaConfig(128, 3, 2)),
        (2000, 512, 2048, 64, WgmmaConfig(256, 1, 5)),
        (700, 768, 640, 768, WgmmaConfig(128, 2, 6)),
    ],
)
def test_wgmma_matches_float64_reference(m, k, n, group_size, config, dtype) -> None:
    check_kernel(awq_wgmma, m, k, n, group_size, config, dtype)


@needs_hopper
def test_wgmma_weights_equal_awq_dequantize() -> None:
    """With one token column of the identity, the kernel's output is the weight it dequantized:
    bit-equal to awq_dequantize's (the same single rounding of (q - z) s), both dtypes."""
    seed = _seed()
    k, n = 256, 256
    qweight, qzeros, scales, _ = _random_weight(k, n, 128, seed)
    for dtype in (torch.bfloat16, torch.float16):
        eye = torch.eye(k, device="cuda", dtype=dtype)
        got = awq_wgmma(eye, qweight, qzeros, scales, WgmmaConfig(128, 1, 4))
        assert torch.equal(got, awq_kernels.awq_dequantize(qweight, qzeros, scales, dtype)), dtype


@needs_hopper
def test_wgmma_reads_activations_tma_cannot() -> None:
    seed = _seed()
    k, n = 512, 256
    qweight, qzeros, scales, w64 = _random_weight(k, n, 128, seed)
    wide = torch.randn(40, k + 3, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
    x = wide[:, 1 : k + 1]
    _check_matmul(awq_wgmma(x, qweight, qzeros, scales), x, w64, seed)


@needs_hopper
def test_wgmma_in_a_cuda_graph_and_through_awq_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """awq_linear sends WGMMA_MIN_TOKENS tokens and more here; replays of a captured call match
    eager calls with split-K counters left at zero."""
    called = []
    monkeypatch.setattr(awq_kernels._awq_wgmma, "awq_wgmma",
                        lambda *a, f=awq_wgmma: called.append(len(a[0])) or f(*a))
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(1024, 512, 128, seed)
    monkeypatch.setattr(awq_kernels._awq_wgmma, "WGMMA_MIN_WEIGHTS", 1024 * 512)  # this small weight counts
    for m in (WGMMA_MIN_TOKENS - 1, WGMMA_MIN_TOKENS, 700, 1100):
        x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(seed + m)).to("cuda", torch.bfloat16)
        _check_matmul(awq_linear(x, qweight, qzeros, scales), x, w64, seed)
    assert called == [WGMMA_MIN_TOKENS, 700]
    x = torch.randn(200, 1024, device="cuda", dtype=torch.bfloat16)
    for config in (WgmmaConfig(128, 4), WgmmaConfig(256, 1, 5)):
        eager = awq_wgmma(x, qweight, qzeros, scales, config)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = awq_wgmma(x, qweight, qzeros, scales, config)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager), config
        assert not ARRIVALS[x.device].any()
