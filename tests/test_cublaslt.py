"""cuBLASLt algorithms picked by timing for the dense linears (engine/kernels/cublaslt.py): the
pick rule on any machine; on a GPU, every candidate against a float64 product, bit-for-bit
repeats, a tuned layer inside a CUDA graph, and an engine with tuning against one without."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from engine.kernels import cublaslt


class _FakeLt:
    """Candidates 0..n-1 for any product; the timings come from the test."""

    def __init__(self, n: int):
        self.n = n

    def algos(self, m, n, k, dtype, count):
        return [f"algo{i}" for i in range(min(self.n, count))]


@pytest.mark.parametrize(("timings", "picked"), [
    ({None: 10.0, "algo0": 10.1, "algo1": 9.9}, None),   # 1% faster: cuBLAS kept
    ({None: 10.0, "algo0": 9.5, "algo1": 9.0}, "algo1"),  # the fastest candidate
    ({None: 10.0, "algo0": 9.5, "algo1": RuntimeError}, "algo0"),  # a candidate that fails is skipped
    ({None: 10.0, "algo0": [9.0, 11.0], "algo1": 10.5}, None),  # faster once, not when timed again
])
def test_tune_keeps_cublas_unless_a_candidate_is_clearly_faster(monkeypatch, timings, picked) -> None:
    calls = []
    sequences = {algo: itertools.cycle(t if isinstance(t, list) else [t]) for algo, t in timings.items()}

    def fake_time(lt, x, weights, out, algo, n_calls, replays=3, between=None):
        calls.append((x.shape[0], algo, n_calls))
        t = next(sequences[algo])
        if t is RuntimeError:
            raise RuntimeError("not supported")
        return t

    monkeypatch.setattr(cublaslt, "time_product", fake_time)
    weights = [torch.zeros(48, 32) for _ in range(3)]
    tuned = cublaslt.tune(_FakeLt(2), weights, [5, 64], min_speedup=1.02, stream_bytes=48 * 32 * 4 * 10)
    assert {m for m, _, _ in calls} == {5, 64}
    assert {c for _, _, c in calls} == {10}  # calls enough to stream 10 weights' bytes
    expected = {} if picked is None else {5: picked, 64: picked}
    assert tuned.algos == expected
    if picked is not None:
        assert tuned.speedups[64] == pytest.approx(10.0 / timings[picked])
    assert tuned.linear(torch.zeros(7, 32), weights[0], None) is None  # a row count not tuned


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().t()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 768, 512), (48, 768, 512), (200, 1536, 1024), (64, 512, 4096)])
def test_every_candidate_matches_a_float64_product_and_repeats_bitwise(dtype, m, n, k) -> None:
    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    w = (0.05 * torch.randn(n, k, device="cuda", generator=gen)).to(dtype)
    ref = _reference(x, w)
    cublas_err = (torch.nn.functional.linear(x, w).double() - ref).abs().max().item()
    lt = cublaslt.LtMatmul(torch.device("cuda"))
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


@gpu
def test_tuned_linear_runs_its_pick_eagerly_and_in_a_cuda_graph() -> None:
    from engine.layers.linear import LinearBase

    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    with torch.device("cuda"):
        layers = [LinearBase(1024, 1536, bias=True).to(torch.bfloat16) for _ in range(2)]
    for layer in layers:
        layer.weight.normal_(0, 0.03, generator=gen)
        layer.bias.normal_(0, 1.0, generator=gen)
    lt = cublaslt.LtMatmul(torch.device("cuda"))
    # min_speedup ~0: a candidate is picked at every row count, whatever the timings.
    tuned = cublaslt.tune(lt, [layer.weight for layer in layers], [32, 96], min_speedup=1e-9)
    assert set(tuned.algos) == {32, 96}
    calls = []
    real = lt.matmul
    lt.matmul = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    layer = layers[0]
    layer.tuned_gemm = tuned
    x = torch.randn(96, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    eager = layer(x)
    assert calls == [96]
    ref = _reference(x, layer.weight) + layer.bias.double()
    cublas_err = (torch.nn.functional.linear(x, layer.weight, layer.bias).double() - ref).abs().max().item()
    assert (eager.double() - ref).abs().max().item() <= 2 * cublas_err + 1e-2
    graph = torch.cuda.CUDAGraph()
    layer(x)  # warm-up before capture
    with torch.cuda.graph(graph):
        captured = layer(x)
    graph.replay()
    assert torch.equal(captured, eager)
    calls.clear()
    y = torch.randn(95, 1024, device="cuda", generator=gen).to(torch.bfloat16)  # a row count not tuned: cuBLAS
    assert torch.equal(layer(y), torch.nn.functional.linear(y, layer.weight, layer.bias))
    assert calls == []


@gpu
def test_engine_with_tuned_gemms_decodes_as_without(tiny_models) -> None:
    """bf16 decode through CUDA graphs with the dense linears' algorithms tuned, against the same
    engine without: the same greedy tokens, up to bf16 near-ties."""
    from engine.config import EngineArgs
    from engine.layers.linear import LinearBase
    from engine.model_config import ModelConfig
    from engine.model_runner import ModelRunner
    from tests.test_model_runner import Driver

    path = tiny_models["llama"]
    outputs = {}
    for tune in (True, False):
        config = ModelConfig.from_pretrained(path, dtype="bfloat16", device="cuda")
        runner = ModelRunner(config, EngineArgs(model=str(path), block_size=16, num_kv_blocks=64, dtype="bfloat16",
                                                attention_backend="triton", max_num_seqs=8, tune_gemms=tune))
        runner.load_model()
        runner.initialize_kv_cache()
        linears = [m for m in runner.model.modules() if isinstance(m, LinearBase)]
        assert all((m.tuned_gemm is not None) == tune for m in linears)
        driver = Driver(runner, budget=64, seed=1)
        prompts = {"a": [(7 * i) % 500 + 2 for i in range(27)], "b": list(range(2, 9)), "c": [5] * 40}
        for rid, prompt in prompts.items():
            driver.add(rid, prompt)
        while any(len(out) < 12 for out in driver.outputs.values()):
            driver.step()
        outputs[tune] = {rid: out[:12] for rid, out in driver.outputs.items()}
    agree = sum(a == b for rid in outputs[True] for a, b in zip(outputs[True][rid], outputs[False][rid]))
    assert agree >= 0.9 * 12 * 3


@gpu
def test_tuning_is_skipped_without_cublaslt(monkeypatch) -> None:
    from engine.layers.linear import LinearBase, tune_dense_linears

    def missing():
        raise OSError("libcublasLt not found")

    cublaslt._lib.cache_clear()
    monkeypatch.setattr(cublaslt, "_lib", missing)
    with torch.device("cuda"):
        model = torch.nn.Sequential(LinearBase(256, 512).to(torch.bfloat16))
    assert "skipped, cuBLASLt unavailable" in tune_dense_linears(model, [16, 32])
    assert model[0].tuned_gemm is None
    x = torch.randn(16, 256, device="cuda").to(torch.bfloat16)
    assert torch.equal(model[0](x), torch.nn.functional.linear(x, model[0].weight))
