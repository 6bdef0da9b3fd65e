"""Which CUDA graph serves a step, and how a step is padded to it (host side: runs on the CPU;
tests/test_gpu.py replays the graphs against eager steps)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineArgs
from engine.cuda_graph import SHORT_GRAPH_MAX_BATCH, GraphShape, StepGraphs, capture_sizes, prefill_capture_sizes
from engine.input_buffers import InputBuffers
from engine.kernels.decode_attention import SHORT_SEQ_LEN
from engine.sampling_params import SamplingParams
from scheduler.outputs import ScheduledRequest

GREEDY = SamplingParams(temperature=0.0)


def _request(rid: str, tokens: list[int], start: int = 0, table=(1, 2, 3, 4), sample: bool = True,
             drafts: list[int] | None = None) -> ScheduledRequest:
    prompt = [1] * (start + len(tokens))
    return ScheduledRequest(rid, tokens, start, list(table), sample, GREEDY, prompt, [], drafts or [])


def test_capture_sizes() -> None:
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert prefill_capture_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_capture_sizes(100) == [16, 32, 64, 100]
    assert prefill_capture_sizes(8) == [8]
    assert prefill_capture_sizes(1) == prefill_capture_sizes(0) == []


def test_shape_for_picks_decode_verify_and_prefill_graphs() -> None:
    buffers = InputBuffers(max_tokens=64, max_reqs=8, max_blocks=8, block_size=16, device=torch.device("cpu"))
    graphs = StepGraphs(None, buffers, None, max_batch_size=8, num_speculative_tokens=2, max_verify_batch_size=4,
                        max_prefill_tokens=100)  # capped by the buffers' 64 tokens
    assert graphs.prefill_sizes == [16, 32, 64]
    decode = [_request(f"d{i}", [5], 3) for i in range(3)]
    assert graphs.shape_for(decode) == GraphShape(4, 1)
    # One request: the graph for requests of at most SHORT_SEQ_LEN tokens while it is that short.
    assert graphs.shape_for([_request("d", [5], SHORT_SEQ_LEN - 1)]) == GraphShape(1, 1, max_seq_len=SHORT_SEQ_LEN)
    long = _request("long", [5], SHORT_SEQ_LEN, table=range(SHORT_SEQ_LEN // 16 + 1))
    assert graphs.shape_for([long]) == GraphShape(1, 1)
    verify = [_request(f"v{i}", [5, 6, 7], 3, drafts=[6, 7]) for i in range(3)]
    assert graphs.shape_for(verify) == GraphShape(4, 3)
    assert graphs.shape_for([_request("p", list(range(2, 22)))]) == GraphShape(1, 32, prefill=True)
    assert graphs.shape_for([_request("p", [2, 3])]) == GraphShape(1, 16, prefill=True)
    # A chunk after cached tokens, one that samples nothing: the same graphs.
    assert graphs.shape_for([_request("p", [2] * 64, 16, sample=False)]) == GraphShape(1, 64, prefill=True)
    # Eager: longer than the largest graph; two requests' prompts; a lone decode takes its decode graph.
    assert graphs.shape_for([_request("p", [2] * 65)]) is None
    assert graphs.shape_for([_request("p", [2] * 9), _request("q", [2] * 9)]) is None
    assert graphs.shape_for([_request("d", [5], 3)]) == GraphShape(1, 1, max_seq_len=SHORT_SEQ_LEN)
    assert StepGraphs(None, buffers, None, max_batch_size=8).shape_for([_request("p", [2] * 9)]) is None


@pytest.mark.parametrize("max_model_len", [256, 4096])
def test_every_graph_is_captured_with_a_step_the_buffers_hold(max_model_len: int) -> None:
    """The step each graph is captured with fits the input buffers: a context shorter than the
    largest prefill graph (512 tokens) caps the prefill graphs at one block table row (256 tokens
    in 16 blocks), where a 512-token graph's table used to overflow the row at start-up."""
    block = 16
    buffers = InputBuffers(max_tokens=2048, max_reqs=4, max_blocks=max_model_len // block, block_size=block,
                           device=torch.device("cpu"))
    graphs = StepGraphs(None, buffers, None, max_batch_size=4, num_speculative_tokens=2, max_verify_batch_size=4,
                        max_prefill_tokens=512)
    assert graphs.prefill_sizes[-1] == min(512, max_model_len)
    for shape in graphs.shapes:
        buffers.prepare(graphs.capture_step(shape), graph_shape=shape)


def test_short_decode_graphs_come_with_the_smallest_batch_sizes_only() -> None:
    """Decode graphs of up to SHORT_GRAPH_MAX_BATCH requests (one) are captured twice (any length,
    and requests of at most SHORT_SEQ_LEN tokens); larger batches and verify graphs once. A short
    graph's steps carry its bound as ``max_seq_len``, and a longer request does not fit it."""
    buffers = InputBuffers(max_tokens=128, max_reqs=64, max_blocks=256, block_size=16, device=torch.device("cpu"))
    graphs = StepGraphs(None, buffers, None, max_batch_size=64, num_speculative_tokens=1, max_verify_batch_size=8)
    short = sorted(s.batch_size for s in graphs.shapes if s.max_seq_len)
    assert short == [s for s in capture_sizes(64) if s <= SHORT_GRAPH_MAX_BATCH] == [1]
    assert all(s.tokens_per_request == 1 and s.max_seq_len == SHORT_SEQ_LEN for s in graphs.shapes if s.max_seq_len)
    assert graphs.shape_for([_request(f"d{i}", [5], 3) for i in range(2)]) == GraphShape(2, 1)
    assert graphs.shape_for([_request("v", [5, 6], 3, drafts=[6])]) == GraphShape(1, 2)
    graphs.one_token_ahead = True  # a small model's: its one-request decode graphs place kernels ahead, both
    ahead = [s for s in graphs.shapes if graphs.places_ahead(s)]
    assert ahead == [GraphShape(1, 1), GraphShape(1, 1, max_seq_len=SHORT_SEQ_LEN)]
    inputs = buffers.prepare([_request("d", [5], 100, table=range(7))], graph_shape=GraphShape(2, 1, max_seq_len=1024))
    assert inputs.metadata.max_seq_len == 1024 and inputs.metadata.seq_lens.tolist() == [101, 0]
    assert buffers.prepare([_request("d", [5], 100, table=range(7))], graph_shape=GraphShape(2, 1)).metadata \
        .max_seq_len == 256 * 16
    with pytest.raises(AssertionError, match="does not fit the graph"):
        buffers.prepare([_request("d", [5], 1024, table=range(65))], graph_shape=GraphShape(2, 1, max_seq_len=1024))


def test_graph_padding_of_a_prefill_step() -> None:
    """A 5-token chunk at positions 6..10, padded to a prefill graph of 8 tokens: the padding
    writes nowhere (slot -1) and lies outside the request's query span, whose length stays 5."""
    buffers = InputBuffers(max_tokens=32, max_reqs=4, max_blocks=4, block_size=4, device=torch.device("cpu"))
    inputs = buffers.prepare([_request("p", [5, 6, 7, 8, 9], 6, table=(3, 1, 2))],
                             graph_shape=GraphShape(1, 8, prefill=True))
    metadata = inputs.metadata
    assert inputs.input_ids.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert inputs.positions.tolist() == [6, 7, 8, 9, 10, 0, 0, 0]
    # Positions 6, 7 in block 1 (slots 6, 7), 8..10 in block 2 (slots 8..10).
    assert metadata.slot_mapping.tolist() == [6, 7, 8, 9, 10, -1, -1, -1]
    assert metadata.query_start_loc.tolist() == [0, 5]
    assert metadata.seq_lens.tolist() == [11]
    assert metadata.max_seq_len == 16  # the bound every replay shares
    assert inputs.logits_indices is None
    with pytest.raises(AssertionError, match="does not fit the graph"):
        buffers.prepare([_request("p", [2] * 9)], graph_shape=GraphShape(1, 8, prefill=True))


def test_max_cuda_graph_prefill_tokens_is_checked() -> None:
    with pytest.raises(ValueError, match="max_cuda_graph_prefill_tokens must be >= 0"):
        EngineArgs(model="m", max_cuda_graph_prefill_tokens=-1)


def _linears(shapes: list[tuple[int, int]], dtype: torch.dtype = torch.bfloat16,
             quantization_config: dict | None = None) -> torch.nn.Module:
    import engine.quantization.awq  # noqa: F401  (registers the "awq" method)
    from engine.layers.linear import LinearBase

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return torch.nn.ModuleList([LinearBase(k, n, quantization_config=quantization_config)
                                        for n, k in shapes])
    finally:
        torch.set_default_dtype(default)


def test_one_token_weights_ahead_only_when_every_gemv_linear_takes_one_slab() -> None:
    """The decode graph of one request places kernels ahead (engine/kernels/pdl.py) only for a
    16-bit dense model whose GEMV linears all request their whole weight before the wait."""
    from engine.layers.linear import one_token_weights_ahead

    # Qwen3-0.6B: qkv, o, gate_up, down, and an LM head too large for the GEMV (cuBLAS).
    small = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)]
    assert one_token_weights_ahead(_linears(small))
    assert one_token_weights_ahead(_linears(small, torch.float16))
    assert not one_token_weights_ahead(_linears(small + [(6144, 4096)]))  # Llama-3.1-8B's qkv: the K loop
    assert not one_token_weights_ahead(_linears(small, torch.float32))  # fp32 runs no GEMV
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert not one_token_weights_ahead(_linears([(4096, 1024)], torch.float16, awq))
