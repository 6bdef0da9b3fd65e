"""Packed linears on the CPU (engine/layers/cpu_linear.py): oneDNN fp32 against a float64
reference and batch-invariant (a row's result does not depend on how many rows come with it);
fp16-storable weights (AWQ, bf16 checkpoints) through sluice's fp16 kernel (batch-invariant too),
or fbgemm's fp16 GEMM where that cannot be built, against a float64 reference; all switched by
``cpu_onednn_linear``."""

from __future__ import annotations

import os

import pytest
import torch

from engine.layers import cpu_linear, cpu_native
from engine.layers.linear import LinearBase
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from service.cli import DEFAULT_MODEL

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
    assert isinstance(layer.packed_weight, torch.Tensor)  # fp32 weights: oneDNN
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


def test_fp16_storable_means_fp16_keeps_every_normal_value() -> None:
    exact = torch.randn(64, 32).half().float()
    assert cpu_linear.fp16_storable(exact)
    assert cpu_linear.fp16_storable(torch.randn(64, 32).bfloat16().float())  # bf16 checkpoints
    assert not cpu_linear.fp16_storable(torch.randn(64, 32))  # fp32 mantissas
    assert not cpu_linear.fp16_storable(exact * 1e5)  # past fp16's range
    tiny = exact.clone()
    tiny[0, :4] = torch.tensor([3e-6, -7e-7, 1e-9, 6e-6])  # below fp16's normal range: rounded, kept
    assert cpu_linear.fp16_storable(tiny)


def _fp16_kernels() -> list:
    kernels = []
    if cpu_native.available():
        kernels.append("sluice")
    if cpu_linear.fp16_available():
        kernels.append("fbgemm")
    return kernels


@pytest.mark.parametrize("kernel", _fp16_kernels())
@pytest.mark.parametrize("in_features,out_features", [(64, 48), (512, 3072), (256, 8192)])
def test_fp16_storable_weights_run_in_fp16_and_match_float64(in_features: int, out_features: int, kernel: str,
                                                             monkeypatch) -> None:
    if kernel == "fbgemm":  # where sluice's kernel cannot be built
        monkeypatch.setattr(cpu_native, "available", lambda: False)
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    layer = LinearBase(in_features, out_features, bias=True)
    weight = (torch.randn(out_features, in_features, generator=gen) * in_features**-0.5).bfloat16().float()
    weight[0, :3] = torch.tensor([5e-6, -2e-7, 3e-8])  # fp16 rounds these by at most 2**-25
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(torch.randn(out_features, generator=gen))
    layer.pack_for_cpu()
    if kernel == "sluice":
        assert layer.packed_weight.dtype == torch.float16 and layer.packed_weight.shape == weight.shape
    else:
        assert isinstance(layer.packed_weight, torch.ScriptObject)  # fbgemm's fp16 params
    x = torch.randn(2, 8, in_features, generator=gen)
    expected = x.double() @ weight.double().T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    one = layer(x[0, :1])
    torch.testing.assert_close(one.double(), expected[0, :1], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    if kernel == "sluice":  # fbgemm rounds a row alone differently from inside a batch
        assert torch.equal(one, layer(x)[0, :1])


@pytest.mark.skipif(not (cpu_native.available() or cpu_linear.fp16_available()), reason="no fp16 kernel")
def test_bundled_awq_model_packs_fp16_and_keeps_its_greedy_tokens() -> None:
    """The AWQ layers' dequantized weights are fp16 values: packed, they run in fp16, and the
    greedy continuation is the one the unpacked model gives."""
    outputs = {}
    for enabled in (True, False):
        llm = LLM(str(DEFAULT_MODEL), max_model_len=256, num_kv_blocks=32, cpu_onednn_linear=enabled)
        model = llm.engine.runner.model
        if enabled:
            packed = model.model.layers[0].mlp.gate_up_proj.packed_weight
            if cpu_native.available():
                assert packed.dtype == torch.float16
            else:
                assert isinstance(packed, torch.ScriptObject)
        out = llm.generate(["def parse_args(argv):"], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
        outputs[enabled] = out[0].outputs[0].token_ids
    assert outputs[True] == outputs[False]
