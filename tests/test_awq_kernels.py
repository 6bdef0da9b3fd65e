"""The AWQ Triton kernels (through the interpreter on CPU) against a float64 reference of the
dequantized weight, on small shapes with random data drawn fresh each run."""

from __future__ import annotations

import os

import pytest
import torch

import engine.kernels.awq_gemm as awq_kernels
from engine.kernels.awq_gemm import (
    FUSED_MAX_TOKENS,
    GEMV_MAX_TOKENS,
    GemmConfig,
    GemvConfig,
    awq_dequantize,
    awq_gemm,
    awq_gemv,
    awq_linear,
    gemm_config,
    gemv_config,
)
from engine.kernels.counters import ARRIVALS
from engine.quantization.awq import pack_int4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"  # the kernels run on CPU tensors only when interpreted


def _random_weight(k: int, n: int, group_size: int, seed: int):
    """Packed AWQ tensors and the exact float64 weight ``(q - z) * s`` [K, N] they encode."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) * 0.1 + 1e-3).half()
    g = torch.arange(k) // group_size
    w64 = (q - z[g]).double() * s[g].double()
    return pack_int4(q).to(DEVICE), pack_int4(z).to(DEVICE), s.to(DEVICE), w64.to(DEVICE)


def _check_matmul(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, seed: int, bias=None) -> None:
    """|y - x @ W| within rounding W and y to the activation dtype plus fp32 accumulation."""
    ref = x.double() @ w64
    magnitude = x.double().abs() @ w64.abs()
    if bias is not None:
        ref, magnitude = ref + bias.double(), magnitude + bias.double().abs()
    eps = torch.finfo(x.dtype).eps
    bound = 2 * (eps + x.shape[-1] * 2**-23) * magnitude + eps * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"seed {seed}: error {worst:.2f}x the rounding bound"


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "n", "group_size"), [(64, 48, 32), (256, 128, 128), (72, 40, 72), (96, 640, 32)])
def test_dequantize_kernel_is_exact(k: int, n: int, group_size: int, dtype: torch.dtype) -> None:
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(k, n, group_size, seed)
    w = awq_dequantize(qweight, qzeros, scales, dtype)
    if dtype == torch.bfloat16 and INTERPRETED:
        # The interpreter truncates fp32 -> bf16 where a GPU rounds: allow that one step.
        torch.testing.assert_close(w.double(), w64, rtol=2**-7, atol=0, msg=f"seed {seed}")
    else:
        # (q - z) * s is exact in fp32, so the kernel rounds once, as the reference does.
        assert torch.equal(w, w64.to(dtype)), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "k", "n", "group_size", "config"),
    [
        (1, 128, 64, 32, None),
        (5, 256, 96, 64, None),  # N not a multiple of BLOCK_N: a TMA box past the edge
        (16, 256, 128, 128, (16, 64, 32, 1)),  # several K tiles per group, no split
        (19, 256, 64, 64, (16, 32, 64, 4)),  # split-K, M not a multiple of BLOCK_M
        (3, 72, 96, 72, None),  # one group over all of K, K not a power of two (rows past K read 0)
        (40, 128, 64, 32, (32, 64, 32, 2)),
        (6, 128, 128, 64, (16, 64, 64, 2, 4, 3, False)),  # few tokens, the weight on the MMA's B side
        (24, 128, 128, 64, (32, 32, 32, 1, 4, 3, True)),  # more tokens, the weight on the A side
    ],
)
def test_fused_gemm_matches_float64_reference(m, k, n, group_size, config, dtype) -> None:
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(k, n, group_size, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    _check_matmul(awq_gemm(x, qweight, qzeros, scales, config), x, w64, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), [(3, 64, 64), (4, 36, 64)])
def test_fused_gemm_reads_activations_tma_cannot(m, k, n, dtype) -> None:
    """Activations at an odd address with an odd row stride (a column slice), and rows of 36
    features (not a multiple of 16 bytes), reach the kernel through a padded copy."""
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(k, n, k, seed)
    wide = torch.randn(m, k + 3, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    x = wide[:, 1 : k + 1]
    _check_matmul(awq_gemm(x, qweight, qzeros, scales), x, w64, seed)


def test_split_k_fills_an_idle_gpu() -> None:
    assert gemm_config(1, 4096, 4096, 128, num_sms=132)[3] > 1
    assert gemm_config(4096, 4096, 4096, 128, num_sms=132)[3] == 1


def test_gemm_config_puts_the_weight_on_the_wide_side_up_to_32_tokens() -> None:
    for m, block_m in [(3, 16), (16, 16), (17, 32), (32, 32)]:
        cfg = gemm_config(m, 6144, 4096, 128, num_sms=132)
        assert cfg.swap_ab and cfg.block_m == block_m and cfg.block_n == 64, (m, cfg)
    assert gemm_config(33, 6144, 4096, 128, num_sms=132).swap_ab is False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "k", "n", "group_size", "config"),
    [
        (1, 128, 64, 32, None),  # the default tiling: split-K over 4 "SMs"
        (2, 256, 96, 64, GemvConfig(8, 16, 1)),  # N not a multiple of 8 * block_w (a TMA box past the edge), no split
        (2, 256, 96, 128, GemvConfig(4, 32, 4, 2)),  # K tiles per group, splits inside one; 2 stages
        (1, 96, 64, 96, GemvConfig(8, 32, 3)),  # one group over all of K = 96
        (2, 128, 256, 32, GemvConfig(32, 32, 2, 4)),  # a warp's 32 lanes on 32 words; 4 stages
        (1, 256, 512, 64, GemvConfig(64, 64, 3)),  # two warps
    ],
)
def test_gemv_matches_float64_reference(m, k, n, group_size, config, dtype) -> None:
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(k, n, group_size, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    _check_matmul(awq_gemv(x, qweight, qzeros, scales, config), x, w64, seed)


def test_split_k_counters_reset() -> None:
    """The last program of each output tile sums the split-K partials and leaves its arrival
    counter at zero, so the next launch (here: several, other inputs, both kernels) is right too."""
    seed = _seed()
    qweight, qzeros, scales, w64 = _random_weight(128, 64, 32, seed)
    gen = torch.Generator().manual_seed(seed)
    for m in (1, 2, 1, 5):
        x = torch.randn(m, 128, generator=gen).to(DEVICE, torch.bfloat16)
        _check_matmul(awq_gemm(x, qweight, qzeros, scales, GemmConfig(16, 32, 32, 4)), x, w64, seed)
        assert not ARRIVALS[x.device].any()
        if m > GEMV_MAX_TOKENS:
            continue
        _check_matmul(awq_gemv(x, qweight, qzeros, scales, GemvConfig(4, 16, 4)), x, w64, seed)
        assert not ARRIVALS[x.device].any()


def test_tma_kernels_reject_what_they_do_not_take() -> None:
    qweight, qzeros, scales, _ = _random_weight(64, 48, 32, _seed())
    with pytest.raises(AssertionError, match="N % 32"):
        awq_gemv(torch.randn(1, 64).to(DEVICE, torch.float16), qweight, qzeros, scales)
    with pytest.raises(AssertionError, match="N % 32"):
        awq_gemm(torch.randn(4, 64).to(DEVICE, torch.float16), qweight, qzeros, scales)
    qweight, qzeros, scales, _ = _random_weight(64, 64, 32, _seed())
    with pytest.raises(AssertionError, match=f"1 to {GEMV_MAX_TOKENS} tokens"):
        awq_gemv(torch.randn(GEMV_MAX_TOKENS + 1, 64).to(DEVICE, torch.float16), qweight, qzeros, scales)


def test_gemv_config() -> None:
    """Llama-3.1-8B's shapes on 132 SMs: one-warp programs of 16 words, 64-row tiles, split-K to
    about eight programs per SM (four for the small qkv and o weights); K tiles always divide K and
    the group."""
    for n, k, per_sm in [(6144, 4096, 4), (4096, 4096, 4), (28672, 4096, 8), (4096, 14336, 8)]:
        cfg = gemv_config(n, k, 128, num_sms=132)
        column_blocks = -(-n // 8 // cfg.block_w)
        assert (cfg.block_w, cfg.block_k) == (16, 64), (n, k, cfg)
        assert abs(column_blocks * cfg.split_k - per_sm * 132) <= column_blocks // 2, (n, k, cfg)
    assert gemv_config(64, 72, 72, num_sms=4) == GemvConfig(8, 8, 9)  # a power of two dividing K = 72
    # Two tokens: at most 7 K tiles a program (gate_up 5 -> 10 splits).
    assert [gemv_config(n, k, 128, num_sms=132).split_k for n, k in [(6144, 4096), (4096, 4096), (28672, 4096),
                                                                      (4096, 14336)]] == [11, 16, 5, 33]
    assert [gemv_config(n, k, 128, 132, tokens=2).split_k for n, k in [(6144, 4096), (4096, 4096), (28672, 4096),
                                                                        (4096, 14336)]] == [11, 16, 10, 33]


@pytest.mark.parametrize(("tokens", "n"), [(1, 32), (1, 48), (4, 32), (4, 48), (GEMV_MAX_TOKENS + 1, 32),
                                           (FUSED_MAX_TOKENS + 1, 32), (300, 32)])
def test_awq_linear_all_paths(tokens: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token takes the gemv, more the fused kernel, many dequantize + matmul, and so do widths
    the TMA kernels do not take (N % 32 != 0); same answer."""
    called = []
    for name in ("awq_gemv", "awq_gemm"):
        kernel = getattr(awq_kernels, name)
        monkeypatch.setattr(awq_kernels, name, lambda *a, kernel=kernel, name=name: called.append(name) or kernel(*a))
    seed = _seed()
    k = 64
    qweight, qzeros, scales, w64 = _random_weight(k, n, 32, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, torch.float16)
    bias = torch.randn(n, generator=gen).to(DEVICE, torch.float16)
    y = awq_linear(x.view(1, tokens, k), qweight, qzeros, scales, bias)
    assert y.shape == (1, tokens, n)
    _check_matmul(y.view(tokens, n), x, w64, seed, bias)
    expected = None
    if n % 32 == 0:
        expected = "awq_gemv" if tokens <= GEMV_MAX_TOKENS else "awq_gemm" if tokens <= FUSED_MAX_TOKENS else None
    assert called == ([expected] if expected else [])
