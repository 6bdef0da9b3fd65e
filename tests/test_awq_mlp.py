"""The persistent AWQ MLP kernel (engine/kernels/awq_mlp.py).

On CPU (CI) the kernel is compiled for sm_90 with the installed Triton. On a Hopper GPU it runs
against the three launches it replaces (``awq_mma`` over gate_up, the SiLU-and-mul kernel,
``awq_mma`` over down: the same splits and roundings, so the same bits) and against a float64
reference of the MLP, random data drawn fresh each run, with its counters left at zero."""

from __future__ import annotations

import re

import pytest
import torch

import engine.kernels.awq_mma as mma
from engine.kernels.activation import silu_and_mul
from engine.kernels.awq_mlp import MLP_MAX_TOKENS, awq_mlp, mlp_supported
from engine.kernels.awq_mma import awq_mma
from engine.kernels.counters import ARRIVALS
from tests.sm90_compile import sm90_sass
from tests.test_awq_kernels import _random_weight, _seed
from tests.test_awq_mma import needs_hopper


def _mlp_weights(hidden: int, inter: int, n_out: int, group_size: int, seed: int):
    gate_up = _random_weight(hidden, 2 * inter, group_size, seed)
    down = _random_weight(inter, n_out, group_size, seed + 1)
    return gate_up, down


def _float64_mlp(x: torch.Tensor, gate_up_w64: torch.Tensor, down_w64: torch.Tensor) -> torch.Tensor:
    gate, up = (x.double() @ gate_up_w64).chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up) @ down_w64


@pytest.mark.skipif(not mma.HAVE_GLUON, reason="this Triton has no Gluon")
def test_kernel_compiles_for_sm90_without_spills() -> None:
    """Llama-3.1-8B's MLP shapes compile for an H100/H200 with this Triton (every layout change
    asserted trivial), with no local memory and awq_mma's 40 mma.sync a 128-row tile (written twice:
    a gate_up tile's activations come with its weight, a down tile's from the item's own buffer)."""
    consts = dict(HIDDEN=4096, INTER=14336, N_OUT=4096, GU_GROUP=128, D_GROUP=128, GU_KPS=2048, GU_SPLIT=2,
                  D_KPS=896, D_SPLIT=16, STAGES=4, USE_PDL=True)
    _, sass = sm90_sass("engine.kernels.awq_mlp", "_awq_mlp_kernel", 8, [128], consts, torch.bfloat16, mma.WARPS)
    assert len(re.findall(r"HMMA\.16816", sass)) == 2 * 40  # a gate_up tile's and a down tile's
    assert not re.findall(r"\b(LDL|STL)\b", sass)


@needs_hopper
@pytest.mark.parametrize("m", range(1, MLP_MAX_TOKENS + 1))
@pytest.mark.parametrize(
    ("hidden", "inter", "n_out", "group_size"),
    [
        (4096, 14336, 4096, 128),  # Llama-3.1-8B: gate_up 2 splits of 16 tiles, down 16 of 7
        (2048, 8192, 4096, 128),  # 4-tile items (the ring's default depth) in both linears
        (4096, 8192, 8192, 256),  # groups of 256 rows
    ],
)
def test_mlp_matches_three_launches_bit_for_bit(m: int, hidden: int, inter: int, n_out: int,
                                                group_size: int) -> None:
    seed = _seed()
    (gqw, gqz, gs, g64), (dqw, dqz, ds, d64) = _mlp_weights(hidden, inter, n_out, group_size, seed)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
    assert mlp_supported(x, (gqw, gqz, gs), (dqw, dqz, ds))
    out = awq_mlp(x, (gqw, gqz, gs), (dqw, dqz, ds))
    separate = awq_mma(silu_and_mul(awq_mma(x, gqw, gqz, gs)), dqw, dqz, ds)
    assert torch.equal(out, separate), f"seed {seed}: {(out.float() - separate.float()).abs().max()}"
    ref = _float64_mlp(x, g64, d64)
    assert ((out.double() - ref).abs() <= 0.02 * ref.abs().max()).all(), f"seed {seed}"
    assert not ARRIVALS[x.device].any()


@needs_hopper
def test_mlp_in_a_cuda_graph() -> None:
    """Replays of a captured launch, one after another and between eager ones, give the eager
    result: every counter is back at zero when a launch ends."""
    seed = _seed()
    (gqw, gqz, gs, _), (dqw, dqz, ds, _) = _mlp_weights(2048, 8192, 4096, 128, seed)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
    eager = awq_mlp(x, (gqw, gqz, gs), (dqw, dqz, ds))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = awq_mlp(x, (gqw, gqz, gs), (dqw, dqz, ds))
    for _ in range(3):
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert torch.equal(awq_mlp(x, (gqw, gqz, gs), (dqw, dqz, ds)), eager)
    assert not ARRIVALS[x.device].any()

