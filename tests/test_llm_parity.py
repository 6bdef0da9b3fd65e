"""End-to-end greedy parity of ``LLM.generate`` with Hugging Face ``transformers`` in float32."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.tiny_models import FAMILIES

MAX_TOKENS = 24


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 7, 12, 16, 17, 23, 30, 41]  # around block sizes 4 and 16, and the window 16
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def _hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def hf_reference(tiny_models: dict[str, Path]) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    ref = {}
    for family, path in tiny_models.items():
        prompts = _prompts(512)
        ref[family] = (prompts, _hf_greedy(path, prompts))
    return ref


ENGINE_SETTINGS = {
    "default": dict(block_size=16, num_kv_blocks=64),
    "chunked_prefill_block4": dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=8, max_num_seqs=8),
    "preemption": dict(block_size=4, num_kv_blocks=20, max_num_batched_tokens=32, max_num_seqs=32, max_model_len=72),
}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family: str, setting: str, async_scheduling: bool, tiny_models,
                                     hf_reference) -> None:
    """Also with asynchronous scheduling: steps scheduled before the previous step's token is
    known (EOS stops, chunked prefill and preemption in play) give the same tokens."""
    prompts, expected = hf_reference[family]
    llm = LLM(str(tiny_models[family]), async_scheduling=async_scheduling, **ENGINE_SETTINGS[setting])
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for o, exp in zip(outputs, expected):
        assert o.outputs[0].finish_reason == ("stop" if exp[-1] == 1 else "length")
    if setting == "preemption":
        assert llm.engine.scheduler.stats().num_preemptions > 0
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_total_blocks
    llm.engine.scheduler.check_integrity()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logprobs_match_transformers_log_softmax(family: str, tiny_models) -> None:
    path = tiny_models[family]
    prompts = _prompts(512, seed=1)[:4]
    llm = LLM(str(path), block_size=4, num_kv_blocks=256)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, logprobs=5))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs):
        gen = out.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen])).logits[0]
        ref = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(gen)], dim=-1)
        assert len(out.outputs[0].logprobs) == len(gen)
        for pos, (tid, entry) in enumerate(zip(gen, out.outputs[0].logprobs)):
            assert abs(entry[tid].logprob - ref[pos, tid].item()) < 1e-4
            assert entry[tid].rank == 1
            top5 = torch.topk(ref[pos], 5).indices.tolist()
            assert set(top5) <= set(entry)
            for t in top5:
                assert abs(entry[t].logprob - ref[pos, t].item()) < 1e-4
