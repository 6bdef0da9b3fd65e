"""The cuBLASLt binding of the GEMM benchmark (bench/cublaslt.py, needs a CUDA device): every
algorithm it lists for a product matches a float64 product as closely as cuBLAS's own kernel,
and gives the same bits when run again."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 768, 512), (48, 768, 512), (200, 1536, 1024), (64, 512, 4096)])
def test_every_candidate_matches_a_float64_product_and_repeats_bitwise(dtype, m, n, k) -> None:
    from bench.cublaslt import LtMatmul

    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    w = (0.05 * torch.randn(n, k, device="cuda", generator=gen)).to(dtype)
    ref = _reference(x, w)
    cublas_err = (torch.nn.functional.linear(x, w).double() - ref).abs().max().item()
    lt = LtMatmul(torch.device("cuda"))
    algos = lt.algos(m, n, k, dtype, 8)
    assert algos
    for index, algo in enumerate(algos):
        out = torch.empty(m, n, device="cuda", dtype=dtype)
        lt.matmul(x, w, out, algo)
        err = (out.double() - ref).abs().max().item()
        # One rounding of the float32 sum to 16 bits, as cuBLAS's own kernel: within twice its error.
        assert err <= 2 * cublas_err + 1e-3, (index, err, cublas_err)
        again = torch.full_like(out, float("nan"))
        lt.matmul(x, w, again, algo)
        assert torch.equal(out, again), index
