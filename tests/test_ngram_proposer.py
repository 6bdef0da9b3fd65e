"""N-gram prompt lookup against hand-computed proposals and a brute-force search."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import pytest

from engine.spec_decode.ngram_proposer import NgramProposer, ngram_lookup
from engine.spec_decode.proposer import DraftRequest


def lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    return ngram_lookup(np.array(tokens, dtype=np.int64), min_n, max_n, k)


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition, directly: the longest suffix n-gram, its last earlier occurrence, the tokens
    after it, the copy continuing through its own output."""
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                out = list(tokens)
                copy_from = start + n
                for i in range(k):
                    out.append(out[copy_from + i])
                return out[len(tokens) :]
    return []


@pytest.mark.parametrize(("tokens", "min_n", "max_n", "k", "expected"), [
    # The 3-gram [1 2 3] beats the later 2-gram [2 3]: longest suffix first.
    ([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3], 1, 3, 4, [4, 5, 9, 2]),
    # With n capped at 2, the last occurrence of [2 3] (positions 6-7) wins.
    ([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3], 1, 2, 2, [7, 1]),
    # Of two occurrences of [5 6], the last one.
    ([5, 6, 1, 5, 6, 2, 5, 6], 2, 2, 2, [2, 5]),
    # Fewer than k tokens after it: the copy runs on through its own proposal ([2 5 6] repeats).
    ([5, 6, 1, 5, 6, 2, 5, 6], 2, 2, 5, [2, 5, 6, 2, 5]),
    ([7] * 10, 1, 4, 3, [7, 7, 7]),
    # Only the 1-gram [3] occurs earlier: nothing when at least 2 tokens must match.
    ([1, 2, 3, 4, 3], 2, 3, 3, []),
    ([1, 2, 3, 4, 3], 1, 3, 3, [4, 3, 4]),
    # An occurrence may not start before the first token: [1 2 3] is only the suffix itself.
    ([2, 3, 1, 2, 3], 3, 3, 2, []),
    ([2, 3, 1, 2, 3], 2, 3, 3, [1, 2, 3]),
    ([4, 5, 6], 1, 3, 2, []),  # nothing repeats
    ([4], 1, 3, 2, []),
    ([4, 4], 1, 3, 0, []),  # no room for drafts
])
def test_hand_computed_proposals(tokens: list[int], min_n: int, max_n: int, k: int, expected: list[int]) -> None:
    assert lookup(tokens, min_n, max_n, k) == expected
    assert brute_force(tokens, min_n, max_n, k) == expected


def test_matches_the_brute_force_search_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        vocab = rng.choice([2, 3, 5, 20])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        min_n = rng.randint(1, 4)
        max_n = rng.randint(min_n, 6)
        k = rng.randint(0, 6)
        assert lookup(tokens, min_n, max_n, k) == brute_force(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)


def test_proposer_searches_prompt_and_output_and_keeps_up_with_new_tokens() -> None:
    proposer = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3)
    rng = random.Random(1)
    prompts = {f"r{i}": [rng.randrange(6) for _ in range(rng.randint(1, 30))] for i in range(8)}
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    for step in range(40):
        for rid in outputs:
            outputs[rid].extend(rng.randrange(6) for _ in range(rng.randint(1, 3)))
        # Some requests sit out a step; they are rebuilt when they come back.
        present = [rid for rid in prompts if (step + int(rid[1:])) % 5]
        requests = [DraftRequest(rid, prompts[rid], outputs[rid], num_draft_tokens=4) for rid in present]
        proposal = proposer.propose(requests)
        assert proposal.draft_probs is None
        assert proposal.draft_token_ids == [brute_force(prompts[rid] + outputs[rid], 1, 3, 4) for rid in present]


def test_a_reused_request_id_is_a_new_context() -> None:
    proposer = NgramProposer(1, 2)
    first = DraftRequest("a", [1, 2, 3, 1], [2], 2)
    assert proposer.propose([first]).draft_token_ids == [[3, 1]]
    again = DraftRequest("a", [9, 8, 9], [], 2)  # same id, another prompt list
    assert proposer.propose([again]).draft_token_ids == [[8, 9]]


def test_bad_lookup_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(0, 3)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(4, 3)


def test_a_2k_token_context_takes_well_under_a_millisecond() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 2048)
    best = min(_timed(lambda: ngram_lookup(tokens, 1, 4, 4)) for _ in range(20))
    assert best < 1e-3


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("rule_name", ["ngram", "draft-model"])
def test_replay_counts_what_the_engine_drafts_and_accepts(tiny_models, rule_name, monkeypatch) -> None:
    """bench/replay_spec_policy.py stands in for the engine when comparing lookups and pause rules:
    on greedy requests its drafts and accepted drafts, request by request, must be the engine's.
    The tiny random model leaves and finds its prompt's loop often enough (120 tokens, 8 prompts)
    that both rules pause some requests."""
    from bench.replay_spec_policy import NO_PAUSE, replay
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.spec_decode.policy import NGRAM_PAUSE_RULE, PauseRule

    rule = NGRAM_PAUSE_RULE if rule_name == "ngram" else PauseRule()
    monkeypatch.setattr(NgramProposer, "pause_rule", rule)
    seed = time.time_ns()
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 60) for _ in range(rng.randint(3, 8))] * rng.randint(2, 4) for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    llm = LLM(str(tiny_models["llama"]), speculative_method="ngram", ngram_prompt_lookup_min=1,
              ngram_prompt_lookup_max=16, max_model_len=192, num_kv_blocks=160)
    drafted = accepted = paused = 0
    for prompt in prompts:
        (out,) = llm.generate([prompt], params)[0].outputs
        expected = replay([(prompt, list(out.token_ids))], 1, 16, 4, rule, 1.0)
        assert (expected["draft_tokens"], expected["accepted_draft_tokens"]) == (
            out.num_draft_tokens, out.num_accepted_draft_tokens), f"seed {seed}, prompt {prompt}"
        drafted, accepted = drafted + out.num_draft_tokens, accepted + out.num_accepted_draft_tokens
        never_paused = replay([(prompt, list(out.token_ids))], 1, 16, 4, NO_PAUSE, 1.0)
        paused += never_paused["draft_tokens"] != expected["draft_tokens"]
    assert drafted > accepted > 0, f"seed {seed}"  # the comparison saw drafts kept and drafts rejected
    assert paused > 0, f"seed {seed}"  # and the rule at work: some request drafted less than it would unpaused
