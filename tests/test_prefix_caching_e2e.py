"""Prefix caching end to end: identical greedy tokens with caching on and off, real hits, salts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(2, 500) for _ in range(3 * BLOCK + 1)]
    prompts = []
    # Shared prefixes ending exactly on a block boundary, one token past it, and mid-block.
    for shared in (BLOCK, 2 * BLOCK, 2 * BLOCK + 1, 3 * BLOCK, 3 * BLOCK + 1, 5):
        tail = [rng.randrange(2, 500) for _ in range(rng.randrange(1, 7))]
        prompts.append(prefix[:shared] + tail)
    prompts.append(list(prefix))  # the whole prefix alone: its last block is capped at len - 1
    prompts.append(prefix[: 2 * BLOCK])  # exactly two blocks: the hit must leave one token to compute
    return prompts


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_caching_on_and_off_give_identical_tokens(family: str, tiny_models: dict[str, Path]) -> None:
    prompts = _shared_prefix_prompts()
    path = str(tiny_models[family])
    off = LLM(path, block_size=BLOCK, num_kv_blocks=256, enable_prefix_caching=False)
    on = LLM(path, block_size=BLOCK, num_kv_blocks=256)
    expected = [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY)]
    # Warm the cache with the first prompt, then run all of them twice (second pass: revived blocks).
    on.generate(prompts[:1], GREEDY)
    for _ in range(2):
        outputs = on.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.num_cached_tokens > 0 for o in outputs)
    assert outputs[-1].num_cached_tokens == BLOCK  # two full blocks, capped to leave a token to sample
    assert on.engine.get_load()["prefix_cache_hit_rate"] > 0.5
    on.engine.scheduler.check_integrity()


def test_different_salts_never_share(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), block_size=BLOCK, num_kv_blocks=160)
    prompt = list(range(10, 10 + 4 * BLOCK + 1))
    llm.generate([prompt], GREEDY, cache_salt="tenant-a")
    other = llm.generate([prompt], GREEDY, cache_salt="tenant-b")[0]
    same = llm.generate([prompt], GREEDY, cache_salt="tenant-a")[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 4 * BLOCK
    assert same.outputs[0].token_ids == other.outputs[0].token_ids


def test_reset_prefix_cache_drops_hits(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), block_size=BLOCK, num_kv_blocks=160)
    prompt = list(range(20, 20 + 3 * BLOCK))
    first = llm.generate([prompt], GREEDY)[0]
    assert llm.engine.reset_prefix_cache()
    again = llm.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_unknown_hash_algorithm_is_rejected(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        LLM(str(llama_dir), block_size=BLOCK, num_kv_blocks=160, prefix_caching_hash_algo="md5")
