"""The draft's lean CPU forward (engine/spec_decode/cpu_draft.py) against the generic forward
(itself checked against transformers in test_llm_parity.py), on every family's tiny model.

With fp32 weights the two must agree to float32 rounding: that pins the folding of each
RMSNorm into the next linear, the joint q/k rotation, the slots, the window and the padding
masks. With fbgemm's fp16 copies (the default where fbgemm runs) they agree to fp16 rounding of
the weights and pick the same tokens wherever that rounding cannot flip them. The KV each writes
must be what the other reads.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import DEFAULT_DRAFT_MODEL, EngineArgs
from engine.cuda_graph import step_logits
from engine.layers import cpu_linear
from engine.model_config import ModelConfig
from engine.quantization import awq
from engine.spec_decode import cpu_draft
from engine.spec_decode.draft_model import DraftModelProposer, load_draft_config
from scheduler.outputs import ScheduledRequest
from tests.tiny_models import FAMILIES

BLOCK_SIZE = 4


def _proposer(path, onednn: bool = False) -> DraftModelProposer:
    """A draft model proposer on the CPU (the lean forward's device, whatever else the machine has)."""
    args = EngineArgs(model=str(path), speculative_model=str(path), block_size=BLOCK_SIZE, max_model_len=128,
                      cpu_onednn_linear=onednn, device="cpu")
    config = load_draft_config(args, ModelConfig.from_pretrained(path, max_model_len=128, device="cpu"))
    proposer = DraftModelProposer(config, args, TorchAttentionBackend())
    proposer.load_model()
    proposer.initialize_kv_cache(num_blocks=64)
    return proposer


def _scheduled(request_id: str, tokens: list[int], start: int, table: list[int]) -> ScheduledRequest:
    return ScheduledRequest(request_id, tokens, start, table, True, None, [], [])


def _requests(rng: random.Random, lengths: list[int], n: int) -> tuple[list[ScheduledRequest], list[ScheduledRequest]]:
    """(prompts, next n tokens) of requests with the given prompt lengths, each on its own blocks
    in shuffled order."""
    blocks = list(range(1, 64))
    rng.shuffle(blocks)
    prompts, steps = [], []
    for i, length in enumerate(lengths):
        table = blocks[i * 15:(i + 1) * 15]
        tokens = [rng.randrange(2, 500) for _ in range(length + n)]
        prompts.append(_scheduled(f"r{i}", tokens[:length], 0, table))
        steps.append(_scheduled(f"r{i}", tokens[length:], length, table))
    return prompts, steps


def _generic(proposer: DraftModelProposer, batch: list[ScheduledRequest]) -> torch.Tensor:
    return step_logits(proposer.model, proposer.buffers, proposer.backend, None, batch)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32-weights", "fbgemm-fp16"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_lean_forward_matches_the_generic_forward(family: str, n: int, fp16: bool, tiny_models,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if fp16 and not cpu_linear.fp16_available():
        pytest.skip("fbgemm's fp16 GEMM is not in this torch build")
    monkeypatch.setattr(cpu_linear, "fp16_available", lambda: fp16)
    proposer = _proposer(tiny_models[family])
    assert proposer.lean is not None
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Different lengths pad the batch; 30 tokens pass Mistral's window of 16.
    prompts, steps = _requests(rng, [5, 30, 11], n)
    for prompt in prompts:  # the prompts' KV, written by the generic forward
        _generic(proposer, [prompt])
    assert not cpu_draft.LeanDraftForward.supports(prompts)  # too long a feed: the generic forward's
    assert cpu_draft.LeanDraftForward.supports(steps)

    caches = [c.clone() for pair in proposer.kv_caches for c in pair]
    expected = _generic(proposer, steps)
    expected_kv = [c.clone() for pair in proposer.kv_caches for c in pair]
    for cache, saved in zip((c for pair in proposer.kv_caches for c in pair), caches, strict=True):
        cache.copy_(saved)
    got = proposer.lean(steps)

    assert got.shape == expected.shape == (len(steps), proposer.config.vocab_size)
    # fp16 copies: each weight within 2**-11 of itself; over 80 draws per family the logits moved by
    # at most 2.2e-3 of the largest (and once 2.5e-3 in CI), so 1e-2 leaves room and still fails
    # a wrong position, slot or mask (errors of order 1).
    tolerance = 1e-2 if fp16 else 2e-5
    error = (got - expected).abs().max()
    assert error <= tolerance * expected.abs().max(), f"seed {seed}"
    # Same tokens wherever the generic forward's top two logits are further apart than the error allows.
    top2 = expected.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * error
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear]), f"seed {seed}"
    for lean_kv, generic_kv in zip((c for pair in proposer.kv_caches for c in pair), expected_kv, strict=True):
        assert (lean_kv - generic_kv).abs().max() <= tolerance * generic_kv.abs().max(), f"seed {seed}"


def test_lean_decode_continues_what_the_generic_forward_wrote_and_back(tiny_models) -> None:
    """Steps alternate between the two forwards over one request's growing context: each step's
    logits match a generic-only run's, so each reads the KV the other wrote."""
    path = tiny_models["llama"]
    mixed, generic_only = _proposer(path), _proposer(path)
    rng = random.Random(7)
    (prompt,), _ = _requests(rng, [9], 0)
    tokens = list(prompt.token_ids)
    _generic(mixed, [prompt])
    _generic(generic_only, [prompt])
    for step in range(8):
        n = 1 + step % 2
        new = [rng.randrange(2, 500) for _ in range(n)]
        batch = [_scheduled("r0", new, len(tokens), prompt.block_table)]
        expected = _generic(generic_only, batch)
        got = mixed.lean(batch) if step % 3 else _generic(mixed, batch)
        assert (got - expected).abs().max() <= 2e-3 * expected.abs().max(), f"step {step}"
        tokens += new


@pytest.mark.parametrize("weights", ["fbgemm", "cached", "dequantized"])
def test_lean_forward_serves_an_awq_draft(weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled AWQ model as a draft, its dense weights taken from fbgemm's packed copy, from
    the dequantized cache, or (no cache: too little memory) dequantized for the lean copy."""
    if weights == "dequantized":
        monkeypatch.setattr(awq, "_cpu_memory_allows", lambda nbytes: False)
    proposer = _proposer(DEFAULT_DRAFT_MODEL.parent / "sluice-pycoder", onednn=weights == "fbgemm")
    assert proposer.lean is not None
    prompts, steps = _requests(random.Random(1), [6, 13], 1)
    for prompt in prompts:
        _generic(proposer, [prompt])
    got, expected = proposer.lean(steps), _generic(proposer, steps)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()


def test_only_float32_drafts_take_the_lean_forward(tiny_models) -> None:
    path = tiny_models["llama"]
    args = EngineArgs(model=str(path), speculative_model=str(path), block_size=BLOCK_SIZE, max_model_len=128,
                      dtype="bfloat16", device="cpu")
    config = load_draft_config(args, ModelConfig.from_pretrained(path, max_model_len=128, dtype="bfloat16",
                                                                 device="cpu"))
    bf16 = DraftModelProposer(config, args, TorchAttentionBackend())
    bf16.load_model()
    bf16.initialize_kv_cache(num_blocks=8)
    assert bf16.lean is None


def test_layers_run_in_torchscript_with_the_python_function_s_results(tiny_models, monkeypatch) -> None:
    """The scripted layer is TorchScript here, and gives the bits its Python source gives (which
    runs where TorchScript is gone)."""
    assert isinstance(cpu_draft._scripted_layer(), torch.jit.ScriptFunction)
    proposer = _proposer(tiny_models["qwen3"])  # q/k norms: the other branch of the layer
    prompts, steps = _requests(random.Random(2), [7, 19], 2)
    for prompt in prompts:
        _generic(proposer, [prompt])
    caches = [c.clone() for pair in proposer.kv_caches for c in pair]
    scripted = proposer.lean(steps)
    for cache, saved in zip((c for pair in proposer.kv_caches for c in pair), caches, strict=True):
        cache.copy_(saved)
    monkeypatch.setattr(cpu_draft, "_scripted_layer", lambda: cpu_draft._layer_forward)
    assert torch.equal(proposer.lean(steps), scripted)
