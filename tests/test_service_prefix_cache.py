"""Prefix caching through a real ``sluice serve`` process: cached prompt tokens in the usage,
cache salts that keep tenants apart, ResetPrefixCache under a running stream, and GetLoad's hit
rate. Every test sends token ids no other test sends, so the session server's cache starts empty
for them whatever ran before."""

from __future__ import annotations

import random
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from service.client import SluiceClient
from sluice.v1 import generation_pb2 as pb
from tests.service_fixtures import NUM_KV_BLOCKS, ServerProcess, wait_for_blocks_freed

BLOCK_SIZE = 16  # the server's default --block-size
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
# Long enough that the stream is still running after two unary round trips, on any machine.
LONG_GREEDY = dict(temperature=0.0, max_tokens=128, ignore_eos=True)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    final: pb.GenerateResponse

    @property
    def cached(self) -> int:
        return self.final.usage.cached_prompt_tokens


def _prompt(seed: int, num_tokens: int) -> list[int]:
    """Random ordinary token ids (0 and 1 are BOS and EOS)."""
    rng = random.Random(seed)
    return [rng.randrange(2, 500) for _ in range(num_tokens)]


def _completion(deltas: list[pb.GenerateResponse]) -> Completion:
    return Completion("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas[-1])


def _generate(client: SluiceClient, prompt: list[int], **fields) -> Completion:
    return _completion(list(client.generate(prompt, **{**GREEDY, **fields})))


def test_shared_prefix_hits_only_within_a_salt_and_greedy_text_is_unchanged(server: ServerProcess, oracle) -> None:
    prefix = _prompt(101, 4 * BLOCK_SIZE)
    first, second = prefix + _prompt(102, 5), prefix + _prompt(103, 5)
    expected = oracle.generate(second, SamplingParams(**GREEDY))[0].outputs[0]
    with SluiceClient(server.address, timeout=60) as client:
        miss = _generate(client, first)
        hit = _generate(client, second)
        other_tenant = _generate(client, second, cache_salt="tenant-b")
        same_tenant = _generate(client, second, cache_salt="tenant-b")
    assert miss.cached == 0
    assert hit.cached == 4 * BLOCK_SIZE  # the shared full blocks; the differing tail is computed
    assert other_tenant.cached == 0  # the unsalted cache holds this prompt, but not for tenant-b
    assert same_tenant.cached == 4 * BLOCK_SIZE
    for completion in (hit, other_tenant, same_tenant):
        assert (completion.text, completion.token_ids) == (expected.text, expected.token_ids)
        assert completion.final.usage.prompt_tokens == len(second)


def test_reset_under_a_running_stream_lets_it_finish_and_empties_the_cache(server: ServerProcess, oracle) -> None:
    prompt = _prompt(201, 4 * BLOCK_SIZE + 5)
    expected = oracle.generate(prompt, SamplingParams(**GREEDY))[0].outputs[0]
    with SluiceClient(server.address, timeout=120) as client:
        assert _generate(client, prompt).token_ids == expected.token_ids
        stream = client.generate(prompt, **LONG_GREEDY)
        deltas = [next(stream)]
        assert client.reset_prefix_cache() is True
        assert client.load().num_running == 1, "the stream ended before the reset: raise max_tokens"
        deltas += list(stream)
        # Computed from scratch, with nothing cached: the reference for the stream.
        after_reset = _generate(client, prompt, **LONG_GREEDY)
    streamed = _completion(deltas)
    # The stream was reading cached blocks when the cache forgot them; they stayed its own.
    assert streamed.cached == 4 * BLOCK_SIZE
    assert after_reset.cached == 0
    assert (streamed.text, streamed.token_ids) == (after_reset.text, after_reset.token_ids)
    assert len(streamed.token_ids) == LONG_GREEDY["max_tokens"]
    assert streamed.final.finish_reason == pb.FINISH_REASON_LENGTH
    assert streamed.token_ids[: GREEDY["max_tokens"]] == expected.token_ids


def test_get_load_hit_rate_rises_with_hits_and_cached_blocks_count_as_free(server: ServerProcess) -> None:
    prompt = _prompt(301, 8 * BLOCK_SIZE + 1)
    with SluiceClient(server.address, timeout=60) as client:
        assert _generate(client, prompt).cached == 0
        after_miss = wait_for_blocks_freed(client.stub)
        # All but the last token hit: a higher ratio than any history of misses and hits can have.
        assert _generate(client, prompt).cached == 8 * BLOCK_SIZE
        after_hit = wait_for_blocks_freed(client.stub)
    assert 0 < after_hit.prefix_cache_hit_rate <= 1
    assert after_hit.prefix_cache_hit_rate > after_miss.prefix_cache_hit_rate
    # The prompt's blocks stay cached after the request, yet are free for others to take.
    assert (after_hit.kv_blocks_used, after_hit.kv_blocks_total) == (0, NUM_KV_BLOCKS - 1)
