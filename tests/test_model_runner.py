"""The model runner driven with hand-made scheduler outputs, against Hugging Face ``transformers``:
greedy tokens through chunked prefill and decode, logprobs, the KV cache's contents, sizing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import EngineArgs
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from scheduler.outputs import ScheduledRequest, SchedulerOutput

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


def _runner(path: Path, **args: object) -> ModelRunner:
    config = ModelConfig.from_pretrained(path)
    runner = ModelRunner(config, EngineArgs(model=str(path), block_size=BLOCK_SIZE, **args))
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


def _hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards (no early stop at EOS: the runner does not stop)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


class Driver:
    """A minimal stand-in for the scheduler: a token budget per step, chunked prefill, random
    non-contiguous blocks per request."""

    def __init__(self, runner: ModelRunner, budget: int, seed: int = 0) -> None:
        self.runner = runner
        self.budget = budget
        self.free = list(range(runner.kv_caches[0][0].shape[0]))
        random.Random(seed).shuffle(self.free)
        self.prompts: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.params: dict[str, SamplingParams] = {}

    def add(self, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> None:
        self.prompts[rid], self.outputs[rid], self.computed[rid], self.tables[rid] = prompt, [], 0, []
        self.params[rid] = params

    def schedule(self, finished: list[str] | None = None) -> SchedulerOutput:
        scheduled, budget = [], self.budget
        for rid, prompt in self.prompts.items():
            tokens = prompt + self.outputs[rid]
            n = min(budget, len(tokens) - self.computed[rid])
            if n <= 0:
                continue
            start = self.computed[rid]
            table = self.tables[rid]
            while len(table) * BLOCK_SIZE < start + n:
                table.append(self.free.pop())
            scheduled.append(ScheduledRequest(
                rid, tokens[start : start + n], start, table, start + n == len(tokens), self.params[rid],
                prompt, self.outputs[rid],
            ))
            budget -= n
        return SchedulerOutput(scheduled, self.budget - budget, finished_request_ids=finished or [])

    def step(self, finished: list[str] | None = None):
        output = self.schedule(finished)
        result = self.runner.execute(output)
        assert set(result.sampled_token_ids) == {r.request_id for r in output.scheduled if r.sample}
        for r in output.scheduled:
            self.computed[r.request_id] += r.num_new_tokens
        for rid, tokens in result.sampled_token_ids.items():
            self.outputs[rid].extend(tokens)
        return result

    def preempt(self, rid: str) -> None:
        """Recompute from scratch, in fresh blocks (the old ones are not given back)."""
        self.computed[rid], self.tables[rid] = 0, []


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_tokens_match_transformers_generate(family: str, tiny_models) -> None:
    path = tiny_models[family]
    prompts = {"a": list(range(2, 9)), "b": [(7 * i) % 500 + 2 for i in range(27)], "c": [5, 6]}
    num_new = 12
    driver = Driver(_runner(path, num_kv_blocks=64), budget=16)
    for rid, prompt in prompts.items():
        driver.add(rid, prompt)
    while any(len(out) < num_new for out in driver.outputs.values()):
        driver.step()
    hf = _hf(path)
    for rid, prompt in prompts.items():
        assert driver.outputs[rid][:num_new] == _hf_greedy(hf, prompt, num_new), rid


def test_non_final_chunk_samples_nothing(llama_dir: Path) -> None:
    driver = Driver(_runner(llama_dir, num_kv_blocks=32), budget=5)
    driver.add("a", list(range(2, 14)))
    assert driver.step().sampled_token_ids == {}
    assert driver.step().sampled_token_ids == {}
    assert list(driver.step().sampled_token_ids) == ["a"]
    assert driver.computed["a"] == 12


def test_logprobs_are_log_softmax_of_transformers_logits(llama_dir: Path) -> None:
    prompt = [3, 141, 59, 26, 53, 58, 97]
    driver = Driver(_runner(llama_dir, num_kv_blocks=32), budget=64)
    driver.add("plain", prompt)
    driver.add("lp", prompt, SamplingParams(temperature=0.0, logprobs=3))
    result = driver.step()
    assert "plain" not in result.logprobs
    [entry] = result.logprobs["lp"]
    with torch.no_grad():
        expected = torch.log_softmax(_hf(llama_dir)(torch.tensor([prompt])).logits[0, -1], dim=-1)
    token = result.sampled_token_ids["lp"][0]
    assert token == int(expected.argmax()) == result.sampled_token_ids["plain"][0]
    assert set(expected.topk(3).indices.tolist()) | {token} == set(entry)
    for tid, lp in entry.items():
        assert lp.logprob == pytest.approx(float(expected[tid]), abs=1e-5)


def test_kv_cache_holds_transformers_keys_at_block_table_slots(tiny_models) -> None:
    """After a chunked prefill and two decode steps, reading the cache through the block table
    gives the rotated keys and the values transformers keeps for the same sequence."""
    path = tiny_models["qwen3"]
    prompt = list(range(40, 59))
    driver = Driver(_runner(path, num_kv_blocks=32), budget=8, seed=3)
    driver.add("a", prompt)
    while len(driver.outputs["a"]) < 3:
        driver.step()
    sequence = (prompt + driver.outputs["a"])[: driver.computed["a"]]
    with torch.no_grad():
        cache = _hf(path)(torch.tensor([sequence]), use_cache=True).cache
    table = driver.tables["a"]
    for layer, (k_cache, v_cache) in enumerate(driver.runner.kv_caches):
        keys = k_cache[table].flatten(0, 1)[: len(sequence)]
        values = v_cache[table].flatten(0, 1)[: len(sequence)]
        hf_layer = cache.layers[layer]
        torch.testing.assert_close(keys, hf_layer.keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, hf_layer.values[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_preempted_request_recomputes_the_same_tokens(llama_dir: Path) -> None:
    driver = Driver(_runner(llama_dir, num_kv_blocks=64), budget=32)
    driver.add("a", list(range(100, 117)))
    driver.add("b", list(range(200, 205)))
    for _ in range(4):
        driver.step()
    before = list(driver.outputs["a"])
    driver.preempt("a")
    del driver.prompts["b"]
    driver.step(finished=["b"])  # "a" re-prefills its prompt and outputs in fresh blocks
    driver.step()
    reference = Driver(_runner(llama_dir, num_kv_blocks=64), budget=32, seed=9)
    reference.add("a", list(range(100, 117)))
    for _ in range(6):
        reference.step()
    assert driver.outputs["a"][: len(before)] == before
    assert driver.outputs["a"] == reference.outputs["a"]


def test_empty_step_returns_nothing(llama_dir: Path) -> None:
    runner = _runner(llama_dir, num_kv_blocks=8)
    out = runner.execute(SchedulerOutput([], 0, preempted_request_ids=["x"], finished_request_ids=["y"]))
    assert out.sampled_token_ids == {} and out.logprobs == {}


def test_kv_cache_sized_from_setting_or_cpu_budget(llama_dir: Path) -> None:
    config = ModelConfig.from_pretrained(llama_dir)
    runner = _runner(llama_dir, num_kv_blocks=37)
    assert runner.kv_caches[0][0].shape == (37, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    assert len(runner.kv_caches) == config.num_layers
    budget_gb = 0.001
    block_bytes = 2 * config.num_layers * BLOCK_SIZE * config.num_kv_heads * config.head_dim * 4
    args = EngineArgs(model=str(llama_dir), block_size=BLOCK_SIZE, cpu_kv_cache_gb=budget_gb)
    runner = ModelRunner(config, args)
    runner.load_model()
    assert runner.initialize_kv_cache() == int(budget_gb * 2**30) // block_bytes
    assert runner.attention_backend_name == "torch"
