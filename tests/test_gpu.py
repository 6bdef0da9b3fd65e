"""GPU-only checks (skipped without CUDA; run on the GPU machine): the ``flash_attn`` backend
against the ``torch`` backend, and CUDA-graph decode against eager decode and transformers."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from engine.attention.backend import get_attention_backend
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import EngineArgs
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from tests.test_kernels_attention import make_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _flash_or_skip():
    backend = get_attention_backend("flash_attn")
    if not backend.is_available(torch.device("cuda")):
        pytest.skip("flash_attn is not importable here")
    return backend


@pytest.mark.parametrize(
    ("query_lens", "sliding_window", "block_size"),
    [([7, 1, 23, 1, 2], None, 16), ([1, 1, 1, 1], None, 16), ([1, 12, 1, 30], 18, 16),
     ([1] * 33, None, 64), ([300, 1, 129], None, 64)],
)
def test_flash_attn_backend_matches_torch_backend(query_lens, sliding_window, block_size) -> None:
    flash = _flash_or_skip()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    context_lens = [rng.choice([0, rng.randint(1, 700)]) for _ in query_lens]
    context_lens[-1] = 70
    b = make_batch(rng, context_lens, query_lens, num_kv_heads=8, group=2, head_dim=128,
                   block_size=block_size, sliding_window=sliding_window, fill_new_tokens=False)
    to = dict(dtype=torch.bfloat16)
    metadata = AttentionMetadata(
        slot_mapping=b.slot_mapping, query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
        block_tables=b.block_tables, max_query_len=max(query_lens), max_seq_len=int(b.seq_lens.max()),
    )
    outs = []
    for backend in (flash, TorchAttentionBackend()):
        cache = (b.key_cache.to(**to).nan_to_num(), b.value_cache.to(**to).nan_to_num())
        outs.append(backend.forward(None, b.query.to(**to), b.key.to(**to), b.value.to(**to), cache,
                                    metadata, 0.088, sliding_window).float())
    err = (outs[0] - outs[1]).norm() / outs[1].norm()
    assert err < 1e-2, f"seed {seed}: relative error {err}"


@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_cuda_graph_decode_equals_eager_and_transformers(tiny_models, backend: str) -> None:
    """Decode steps replayed from CUDA graphs give the logits of eager steps, and the greedy
    tokens transformers gives (float32 for triton; bfloat16 logits closeness for flash_attn)."""
    from tests.test_model_runner import Driver, _hf, _hf_greedy

    if backend == "flash_attn":
        _flash_or_skip()
    dtype = "float32" if backend == "triton" else "bfloat16"
    path = tiny_models["qwen3"]
    runners = {}
    for eager in (False, True):
        config = ModelConfig.from_pretrained(path, dtype=dtype, device="cuda")
        runner = ModelRunner(config, EngineArgs(model=str(path), block_size=16, num_kv_blocks=64, dtype=dtype,
                                                attention_backend=backend, enforce_eager=eager, max_num_seqs=8))
        runner.load_model()
        runner.initialize_kv_cache()
        assert (runner.graphs is None) == eager
        runners[eager] = runner
    prompts = {"a": [(7 * i) % 500 + 2 for i in range(27)], "b": list(range(2, 9)), "c": [5] * 40}
    num_new = 12
    drivers = {}
    for eager, runner in runners.items():
        driver = Driver(runner, budget=64, seed=1)
        for rid, prompt in prompts.items():
            driver.add(rid, prompt)
        while any(len(out) < num_new for out in driver.outputs.values()):
            driver.step()
        drivers[eager] = driver
    if backend == "triton":
        hf = _hf(path)
        for rid, prompt in prompts.items():
            expected = _hf_greedy(hf, prompt, num_new)
            assert drivers[False].outputs[rid][:num_new] == expected, rid
            assert drivers[True].outputs[rid][:num_new] == expected, rid
    else:
        agree = sum(a == b for rid in prompts
                    for a, b in zip(drivers[False].outputs[rid][:num_new], drivers[True].outputs[rid][:num_new]))
        assert agree >= 0.9 * num_new * len(prompts)


def _verify_runner(path, backend: str, dtype: str, eager: bool, k: int) -> ModelRunner:
    config = ModelConfig.from_pretrained(path, dtype=dtype, device="cuda")
    runner = ModelRunner(config, EngineArgs(
        model=str(path), block_size=16, num_kv_blocks=64, dtype=dtype, attention_backend=backend,
        enforce_eager=eager, max_num_seqs=8, speculative_method="ngram", num_speculative_tokens=k,
        speculative_disable_batch_size=4))
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_cuda_graph_verify_equals_eager_verify(tiny_models, backend: str) -> None:
    """A verify step (every request 1 + k tokens, k drafts) replayed from a CUDA graph gives the
    logits of the same step run eagerly, at all 1 + k positions of each request, padding and all
    (3 requests replay the graph of 4)."""
    from engine.cuda_graph import GraphShape, step_logits
    from engine.sampling_params import SamplingParams
    from scheduler.outputs import ScheduledRequest, SchedulerOutput

    if backend == "flash_attn":
        _flash_or_skip()
    dtype = "float32" if backend == "triton" else "bfloat16"
    k = 3
    path = tiny_models["qwen3"]
    greedy = SamplingParams(temperature=0.0)
    prompts = [[(7 * i) % 500 + 2 for i in range(27)], list(range(2, 9)), [5] * 40]
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(prompts))]
    logits = {}
    for eager in (False, True):
        runner = _verify_runner(path, backend, dtype, eager, k)
        assert (runner.graphs is None) == eager
        prefill = [ScheduledRequest(f"r{i}", p, 0, tables[i], True, greedy, p, []) for i, p in enumerate(prompts)]
        out = runner.execute(SchedulerOutput(prefill, sum(map(len, prompts))))
        verify = [ScheduledRequest(f"r{i}", [out.sampled_token_ids[f"r{i}"][0], 3, 4, 5], len(p), tables[i], True,
                                   greedy, p, out.sampled_token_ids[f"r{i}"], [3, 4, 5]) for i, p in enumerate(prompts)]
        if not eager:
            assert runner.graphs.shape_for(verify) == GraphShape(4, 1 + k)
        logits[eager] = step_logits(runner.model, runner.buffers, runner.attention_backend, runner.graphs,
                                    verify).clone()
    assert logits[False].shape == logits[True].shape == (len(prompts) * (1 + k), logits[True].shape[-1])
    if backend == "triton":
        torch.testing.assert_close(logits[False], logits[True], atol=1e-3, rtol=1e-3)
    else:
        agree = (logits[False].argmax(-1) == logits[True].argmax(-1)).float().mean().item()
        assert agree >= 0.9


@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_cuda_graph_prefill_equals_eager_prefill(tiny_models, backend: str) -> None:
    """Steps of one request replayed from prefill graphs (its tokens padded to 16, 32 or 64) give
    the logits of the same steps run eagerly: a whole prompt; a first chunk, which samples nothing;
    the chunk after it, which attends to the first one's cached keys. A step longer than the
    largest graph runs eagerly."""
    from engine.cuda_graph import GraphShape, step_logits
    from engine.sampling_params import SamplingParams
    from scheduler.outputs import ScheduledRequest

    if backend == "flash_attn":
        _flash_or_skip()
    dtype = "float32" if backend == "triton" else "bfloat16"
    path = tiny_models["qwen3"]
    greedy = SamplingParams(temperature=0.0)
    a, b, c = [(7 * i) % 500 + 2 for i in range(27)], [(11 * i) % 300 + 3 for i in range(50)], [9] * 100
    steps = [
        [ScheduledRequest("a", a, 0, [1, 2], True, greedy, a, [])],
        [ScheduledRequest("b", b[:40], 0, [3, 4, 5, 6], False, greedy, b, [])],
        [ScheduledRequest("b", b[40:], 40, [3, 4, 5, 6], True, greedy, b, [])],
        [ScheduledRequest("c", c, 0, list(range(7, 14)), True, greedy, c, [])],
    ]
    expected_shapes = [GraphShape(1, 32, True), GraphShape(1, 64, True), GraphShape(1, 16, True), None]
    logits = {}
    for eager in (False, True):
        config = ModelConfig.from_pretrained(path, dtype=dtype, device="cuda")
        runner = ModelRunner(config, EngineArgs(model=str(path), block_size=16, num_kv_blocks=64, dtype=dtype,
                                                attention_backend=backend, enforce_eager=eager, max_num_seqs=8,
                                                max_cuda_graph_prefill_tokens=64))
        runner.load_model()
        runner.initialize_kv_cache()
        if not eager:
            assert runner.graphs.prefill_sizes == [16, 32, 64]
            assert [runner.graphs.shape_for(step) for step in steps] == expected_shapes
        logits[eager] = []
        for step in steps:
            out = step_logits(runner.model, runner.buffers, runner.attention_backend, runner.graphs, step)
            logits[eager].append(None if out is None else out.clone())
    assert logits[False][1] is None and logits[True][1] is None
    for graph, eager in zip(logits[False], logits[True], strict=True):
        if eager is None:
            continue
        assert graph.shape == eager.shape == (1, eager.shape[-1])
        if backend == "triton":
            torch.testing.assert_close(graph, eager, atol=1e-3, rtol=1e-3)
        else:
            assert graph.argmax(-1).item() == eager.argmax(-1).item()
            assert (graph.float() - eager.float()).abs().max().item() < 0.1 * eager.float().abs().max().item()


def test_draft_model_drafts_the_same_with_cuda_graphs(tiny_models) -> None:
    """The draft model's decode forwards replayed from CUDA graphs draft what eager ones do."""
    from engine.attention.backend import get_attention_backend
    from engine.sampling_params import SamplingParams
    from engine.spec_decode.draft_model import DraftModelProposer, load_draft_config
    from engine.spec_decode.proposer import DraftRequest

    target, draft = tiny_models["llama"], tiny_models["qwen3"]
    args = EngineArgs(model=str(target), speculative_model=str(draft), block_size=16, dtype="float32",
                      max_model_len=256, max_num_seqs=8)
    greedy = SamplingParams(temperature=0.0)
    drafts = {}
    for graph_batch_size in (None, 4):
        config = load_draft_config(args, ModelConfig.from_pretrained(target, dtype="float32", device="cuda",
                                                                     max_model_len=256))
        proposer = DraftModelProposer(config, args, get_attention_backend("triton"), (1,), graph_batch_size)
        proposer.load_model()
        proposer.initialize_kv_cache(64)
        assert (proposer.graphs is None) == (graph_batch_size is None)
        requests = [DraftRequest(f"r{i}", [(11 * i + j) % 500 + 2 for j in range(9 + 5 * i)], [], 4, greedy,
                                 list(range(1 + 8 * i, 9 + 8 * i))) for i in range(3)]
        drafts[graph_batch_size] = proposer.propose(requests).draft_token_ids
    assert drafts[None] == drafts[4]


def test_async_scheduling_with_cuda_graphs_equals_sync(tiny_models) -> None:
    """Placeholder inputs filled on the device feed graph replays: tokens equal the sync run's."""
    from engine import LLM, SamplingParams

    path = tiny_models["llama"]
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 500) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(str(path), dtype="float32", attention_backend="triton", block_size=16, num_kv_blocks=128,
                  max_num_seqs=16, async_scheduling=async_scheduling)
        assert llm.engine.runner.graphs is not None
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("ahead", [False, True], ids=["wait_first", "trigger_before_wait"])
def test_pdl_chain_in_cuda_graph_equals_plain_launches(monkeypatch, ahead: bool) -> None:
    """Kernels launched with programmatic dependent launch (engine/kernels/pdl.py) wait for the
    kernel before them: a chain of dependent launches — fused add + RMSNorm writing the residual
    in place, then a split-K GEMV and its partial sum (96 launches), or, with kernels placed
    ahead, a one-slab GEMV whose weight loads precede its wait (64) — replayed from a CUDA graph
    gives, bit for bit and on every replay, what plain launches give."""
    from engine.kernels import pdl
    from engine.kernels.gemv import GemvConfig, gemv
    from engine.kernels.rms_norm import fused_add_rms_norm

    if not pdl.pdl_args(torch.device("cuda")):
        pytest.skip("this GPU has no programmatic dependent launch")
    seed = random.randrange(2**32)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dim, layers = 1024, 32
    weights = [torch.randn(dim, dim, device="cuda", generator=gen, dtype=torch.bfloat16) / dim**0.5
               for _ in range(layers)]
    norm = torch.rand(dim, device="cuda", generator=gen, dtype=torch.bfloat16) + 0.5
    x0 = torch.randn(1, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    config = GemvConfig(block_n=4, block_k=1024, split_k=1) if ahead else GemvConfig(block_n=4, block_k=256, split_k=4)

    def chain(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        for w in weights:
            h, residual = fused_add_rms_norm(x, residual, norm, 1e-6)
            x = gemv(h, w, config, slab=ahead)
        return x + residual

    with monkeypatch.context() as m:
        m.setattr(pdl, "_enabled", lambda device: False)
        expected = chain(x0.clone(), torch.zeros_like(x0))
    residual = torch.zeros_like(x0)
    order = pdl.trigger_before_wait if ahead else contextlib.nullcontext
    with order():
        chain(x0, residual.clone())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), order():
        out = chain(x0, residual)
    for replay in range(20):
        residual.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected), f"seed {seed}: replay {replay} differs from plain launches"


def test_one_request_decode_graph_with_kernels_placed_ahead_equals_eager(tiny_models) -> None:
    """A bf16 model small enough that every linear takes one GEMV slab: its one-request decode
    graph is captured with kernels placed ahead (engine/kernels/pdl.py's trigger_before_wait)
    and decodes, token for token, what eager steps (the same kernels, each waiting first) do."""
    from tests.test_model_runner import Driver

    path = tiny_models["qwen3"]
    outputs = {}
    for eager in (False, True):
        config = ModelConfig.from_pretrained(path, dtype="bfloat16", device="cuda")
        runner = ModelRunner(config, EngineArgs(model=str(path), block_size=16, num_kv_blocks=64, dtype="bfloat16",
                                                attention_backend="triton", enforce_eager=eager, max_num_seqs=4))
        runner.load_model()
        runner.initialize_kv_cache()
        if not eager:
            from engine.kernels.pdl import pdl_args

            assert runner.graphs.one_token_ahead == bool(pdl_args(torch.device("cuda")))
        driver = Driver(runner, budget=64, seed=1)
        driver.add("a", [(7 * i) % 500 + 2 for i in range(21)])
        while len(driver.outputs["a"]) < 40:
            driver.step()
        outputs[eager] = driver.outputs["a"][:40]
    assert outputs[False] == outputs[True]


def test_kv_cache_sized_from_memory_with_fewer_sequences_than_the_budget_holds(tiny_models) -> None:
    """The memory-profiling forward runs at most ``max_num_seqs`` requests (the input buffers hold
    no more): a token budget of 8 whole contexts with 2 sequences allowed profiles 2 contexts, and
    the cache is sized from free memory."""
    path = tiny_models["qwen3"]
    config = ModelConfig.from_pretrained(path, dtype="bfloat16", device="cuda", max_model_len=256)
    runner = ModelRunner(config, EngineArgs(model=str(path), block_size=16, dtype="bfloat16", max_num_seqs=2,
                                            max_model_len=256, max_num_batched_tokens=2048, enforce_eager=True,
                                            attention_backend="triton", gpu_memory_utilization=0.3))
    runner.load_model()
    assert runner.initialize_kv_cache() > 2 * 256 // 16


@pytest.mark.parametrize("with_residual", [False, True])
def test_linear_takes_the_norm_before_it_into_its_gemv(monkeypatch, with_residual: bool) -> None:
    """One token through a bf16 linear whose GEMV programs hold their whole slab (Qwen3-0.6B's
    qkv shape): ``forward_normed`` runs the residual add and RMSNorm inside the GEMV, giving the
    sum bit for bit and the product within bf16 rounding of the norm kernel then the GEMV."""
    from engine.kernels import gemv as gemv_module
    from engine.layers.linear import LinearBase, normed_then
    from engine.layers.norm import RMSNorm

    fused_calls = []
    real = gemv_module.gemv_rms_norm
    monkeypatch.setattr(gemv_module, "gemv_rms_norm", lambda *a, **kw: fused_calls.append(1) or real(*a, **kw))
    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    with torch.device("cuda"):
        layer = LinearBase(1024, 4096).to(torch.bfloat16)
        norm = RMSNorm(1024, 1e-6).to(torch.bfloat16)
    layer.weight.normal_(0, 0.03, generator=gen)
    norm.weight.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(1, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    residual = torch.randn(1, 1024, device="cuda", generator=gen).to(torch.bfloat16) if with_residual else None
    out, total = layer.forward_normed(x, None if residual is None else residual.clone(), norm)
    assert fused_calls
    expected_out, expected_total = normed_then(layer.forward, x, None if residual is None else residual.clone(), norm)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(out, expected_out, rtol=1e-2, atol=1e-2)
