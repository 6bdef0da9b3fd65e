"""The dense few-token GEMV kernel (through Triton's interpreter on CPU) against a float64
reference, with random data drawn fresh each run."""

from __future__ import annotations

import os

import pytest
import torch

from engine.kernels.gemv import GemvConfig, default_config, gemv, slab_fits

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "config", "slab"),
    [
        (1, 40, 64, GemvConfig(16, 32), False),  # N not a multiple of BLOCK_N
        (1, 40, 64, GemvConfig(16, 32), True),  # the same as one slab
        (2, 32, 96, GemvConfig(8, 64), False),  # K not a multiple of BLOCK_K: masked tiles
        (2, 32, 96, GemvConfig(8, 64), True),  # a slab of K not a power of two: its tail masked
        (3, 24, 128, GemvConfig(8, 32, split_k=2), False),  # split K, M between the token tiles
        (4, 16, 200, GemvConfig(4, 32, split_k=4), False),  # split K with a ragged last range
        (4, 17, 200, GemvConfig(4, 32), True),  # four tokens, one slab, a ragged last program
        (1, 48, 256, None, None),  # the default tiling (a slab at this size)
    ],
)
def test_gemv_matches_float64_reference(m, n, k, config, slab, dtype) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    y = gemv(x.to(DEVICE), w.to(DEVICE), config, slab=slab).cpu()
    ref = x.double() @ w.double().T
    # fp32 accumulation of exact products, then one rounding to the output dtype.
    bound = (k * 2**-23) * (x.double().abs() @ w.double().abs().T) + torch.finfo(dtype).eps * ref.abs()
    assert y.dtype == dtype and y.shape == (m, n)
    worst = ((y.double() - ref).abs() / (bound + 1e-30)).max().item()
    assert worst <= 1.0, f"seed {seed}: error {worst:.2f}x the rounding bound"


def test_default_config_is_the_measured_tiling() -> None:
    # The best tilings of bench/results/gemv_h200.json (within 4%) for a 0.6B and an 8B model.
    assert default_config(1024, 2048) == GemvConfig(4, 1024, 1, 8)  # 0.6B o_proj
    assert default_config(6144, 1024) == GemvConfig(8, 512, 1, 4)  # 0.6B gate_up_proj
    assert default_config(28672, 4096) == GemvConfig(16, 256, 1, 4)  # 8B gate_up_proj
    assert default_config(24, 40).block_k == 64  # tiny K: one tile


def test_slab_fits_every_small_model_linear_and_no_large_one() -> None:
    # Qwen3-0.6B's qkv, o, gate_up, down: one tile each; Llama-3.1-8B's: the K loop.
    assert all(slab_fits(n, k) for n, k in [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])
    assert not any(slab_fits(n, k) for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
    assert not slab_fits(48, 256, GemvConfig(4, 64, split_k=2))
    with pytest.raises(AssertionError, match="split_k must be 1"):
        gemv(torch.zeros(1, 256, device=DEVICE), torch.zeros(48, 256, device=DEVICE), GemvConfig(4, 64, 2), slab=True)


@pytest.mark.parametrize("slab", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_with_silu_mul_equals_the_activation_kernel_then_gemv(m, dtype, slab) -> None:
    """The activation fused into the loads: bit for bit the SiLU-and-mul kernel's output (same
    fp32 math, same rounding) through the same GEMV."""
    from engine.kernels.activation import silu_and_mul

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    k, n = 96, 40
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 3).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    config = GemvConfig(8, 32)
    fused = gemv(gate_up, w, config, silu_mul=True, slab=slab)
    assert torch.equal(fused, gemv(silu_and_mul(gate_up), w, config, slab=slab)), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("n", "k", "config"), [(40, 64, GemvConfig(16, 32)), (17, 96, GemvConfig(4, 32)),
                                                 (48, 256, None)])
def test_gemv_rms_norm_matches_float64_reference(n, k, config, with_residual, dtype) -> None:
    """The residual add and RMSNorm inside a one-slab GEMV's loads against the norm's roundings
    (engine/layers/norm.py) with a float64 statistic and a float64 product; the sum exactly as
    the RMSNorm kernel forms it."""
    from engine.kernels.gemv import gemv_rms_norm
    from engine.kernels.rms_norm import fused_add_rms_norm

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    eps = 1e-6
    x = (torch.randn(1, k, generator=gen) * 2).to(dtype)
    residual = torch.randn(1, k, generator=gen).to(dtype) if with_residual else None
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x_dev = x.to(DEVICE)
    y, total = gemv_rms_norm(x_dev, None if residual is None else residual.to(DEVICE), norm_weight.to(DEVICE),
                             eps, w.to(DEVICE), config)
    if residual is None:
        assert total is x_dev  # the first layer's residual is its input
    else:
        _, expected = fused_add_rms_norm(x.to(DEVICE), residual.to(DEVICE), norm_weight.to(DEVICE), eps)
        assert torch.equal(total, expected), f"seed {seed}"
    h = total.cpu()
    rstd = torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + eps)
    s = ((h.double() * rstd).to(dtype).double() * norm_weight.double()).to(dtype).double()
    ref = s @ w.double().T
    # The kernel's fp32 statistic (k terms) may round the normalized row differently by one unit
    # of the dtype in places; then fp32 accumulation and one rounding, as in the plain GEMV.
    spread = s.abs() @ w.double().abs().T
    bound = (k * 2**-23 + 2 * torch.finfo(dtype).eps) * spread + torch.finfo(dtype).eps * ref.abs()
    assert y.dtype == dtype and y.shape == (1, n)
    worst = ((y.cpu().double() - ref).abs() / (bound + 1e-30)).max().item()
    assert worst <= 1.0, f"seed {seed}: error {worst:.2f}x the rounding bound"
    # The norm matters at this bound: the plain GEMV of the un-normalized row is far outside it.
    plain = h.double() @ w.double().T
    assert ((plain - ref).abs() > bound).any()
