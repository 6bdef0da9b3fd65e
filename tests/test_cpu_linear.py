"""oneDNN-packed fp32 linears on the CPU (engine/layers/cpu_linear.py): against a float64
reference, batch-invariant (a row's result does not depend on how many rows come with it), and
switched by ``cpu_onednn_linear``."""

from __future__ import annotations

import os

import pytest
import torch

from engine.layers import cpu_linear
from engine.layers.linear import LinearBase
from engine.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("in_features,out_features", [(64, 48), (512, 3072), (256, 8192)])
def test_packed_linear_matches_float64_and_is_batch_invariant(in_features: int, out_features: int) -> None:
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; the seed is in any failure
    gen = torch.Generator().manual_seed(seed)
    layer = LinearBase(in_features, out_features, bias=True)
    layer.weight.data.copy_(torch.randn(out_features, in_features, generator=gen) * in_features**-0.5)
    layer.bias.data.copy_(torch.randn(out_features, generator=gen))
    x = torch.randn(2, 8, in_features, generator=gen)
    plain = layer(x)
    layer.pack_for_cpu()
    assert layer.packed_weight is not None
    packed = layer(x)
    expected = x.double() @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(packed.double(), expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(plain, packed, rtol=1e-5, atol=1e-5)
    rows = x.reshape(16, in_features)
    one_by_one = torch.cat([layer(rows[i:i + 1]) for i in range(16)])
    assert torch.equal(one_by_one, layer(rows))  # the same bits whatever the row count
    assert torch.equal(layer(rows[:5]), layer(rows)[:5])


def test_engine_packs_cpu_linears_unless_told_not_to(tiny_models) -> None:
    outputs = {}
    for enabled in (True, False):
        llm = LLM(str(tiny_models["llama"]), max_model_len=64, num_kv_blocks=32, cpu_onednn_linear=enabled)
        linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)]
        assert linears and all((m.packed_weight is not None) == enabled for m in linears)
        out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        outputs[enabled] = out[0].outputs[0].token_ids
    assert outputs[True] == outputs[False]
