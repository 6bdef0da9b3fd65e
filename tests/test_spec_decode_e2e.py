"""Speculative decoding through the whole engine, on the tiny models of every family.

The oracle for greedy decoding is the engine without speculation (itself checked against
transformers in test_llm_parity.py): with drafts from n-gram lookup, from the target as its own
draft (nearly every draft accepted), from a noisy copy of it (about half accepted) and from an
unrelated model (nearly all rejected), the tokens must be the same, with chunked prefill, prefix
hits and preemption in play, and every KV block back in the pool at the end. The draft model's
own drafts are checked against transformers' greedy continuation of the draft, through partial
acceptance and preemption. For sampling, the first three tokens follow the target model's exact
distribution (computed with transformers in float64), with and without a draft.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chi2, chisquare, ncx2
from transformers import AutoModelForCausalLM

import engine.spec_decode.policy as policy
from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import DEFAULT_DRAFT_MODEL, EngineArgs
from engine.cuda_graph import GraphShape
from engine.input_buffers import InputBuffers
from engine.kv_cache import kv_block_bytes
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.model_config import ModelConfig
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.spec_decode.draft_model import DraftModelProposer, load_draft_config
from engine.spec_decode.ngram_proposer import NgramProposer
from engine.spec_decode.policy import NGRAM_PAUSE_RULE, SpeculationPolicy
from engine.spec_decode.proposer import DraftRequest
from scheduler.outputs import ScheduledRequest
from scheduler.request import RequestStatus
from service.cli import build_parser, engine_args_of
from service.client import SluiceClient
from service.deltas import coalesce
from service.responses import responses_of
from tests.service_fixtures import free_port, scrape_metrics, start_server, wait_until_serving
from tests.tiny_models import FAMILIES, build_model

BLOCK_SIZE = 4
# Few blocks (preemption), a small token budget (chunked prefill); speculation at any batch size.
PRESSURE = dict(block_size=BLOCK_SIZE, max_model_len=80, num_kv_blocks=30, max_num_batched_tokens=16,
                max_num_seqs=4, speculative_disable_batch_size=None)
# Mistral's sliding window (16) frees blocks behind it: it needs fewer blocks to feel pressure.
PRESSURE_BLOCKS = {"mistral": 14}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False)
DRAFTS = ("ngram", "self", "noisy", "unrelated")


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(2, 500) for _ in range(12)]  # two prompts share three full blocks
    prompts = [[rng.randrange(2, 500) for _ in range(n)] for n in (5, 9, 17, 30)]
    prompts += [shared + [7, 8, 9], shared + [11]]
    # Repeated text gives the n-gram proposer matches to draft from.
    prompts[1] = prompts[1] + prompts[1] + prompts[1][:4]
    return prompts


def _noisy_copy(src: Path, dst: Path, scale: float) -> Path:
    """``src`` with every weight matrix perturbed by ``scale`` of its standard deviation."""
    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(0)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({name: t + scale * t.std() * torch.randn(t.shape, generator=generator) if t.dim() > 1 else t
                   for name, t in tensors.items()}, file, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def drafts(tiny_models: dict[str, Path], tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, dict[str, Path]]:
    """family -> draft kind -> checkpoint: the target itself, a noisy copy, another seed's model."""
    root = tmp_path_factory.mktemp("drafts")
    return {f: {"self": tiny_models[f],
                "noisy": _noisy_copy(tiny_models[f], root / f"{f}-noisy", 0.02),
                "unrelated": build_model(root / f"{f}-seed1", f, tokenizer_dir, seed=1)}
            for f in FAMILIES}


@pytest.fixture(scope="module")
def baselines(tiny_models: dict[str, Path]) -> dict[str, list[list[int]]]:
    """family -> greedy outputs without speculation, under the same pressure."""
    return {f: _generate(LLM(str(tiny_models[f]), **_pressure(f)), _prompts(), GREEDY)[0] for f in FAMILIES}


def _pressure(family: str) -> dict[str, object]:
    return {**PRESSURE, "num_kv_blocks": PRESSURE_BLOCKS.get(family, PRESSURE["num_kv_blocks"])}


def _generate(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
              ) -> tuple[list[list[int]], list[CompletionOutput]]:
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    return [o.token_ids for o in outs], outs


def _speculative(family: str, draft: str, tiny_models, drafts, **overrides: object) -> LLM:
    # The tiny random models repeat single tokens, so lookup from one token up keeps their n-gram
    # drafts coming (the engine's default starts at two).
    spec = ({"speculative_method": "ngram", "ngram_prompt_lookup_min": 1, "ngram_prompt_lookup_max": 4}
            if draft == "ngram" else {"speculative_model": str(drafts[family][draft])})
    return LLM(str(tiny_models[family]), **{**_pressure(family), **spec, **overrides})


def _assert_pool_intact(llm: LLM) -> None:
    scheduler = llm.engine.scheduler
    scheduler.check_integrity()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_are_identical_with_and_without_speculation(
        family: str, draft: str, tiny_models, drafts, baselines, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the unrelated draft (and n-gram) drafting (heavy rejection all along) instead of switching it off.
    monkeypatch.setattr(policy, "MIN_ACCEPTANCE", 0.0)
    monkeypatch.setattr(NgramProposer, "pause_rule", None)  # None: the module's rule, patched above
    llm = _speculative(family, draft, tiny_models, drafts)
    tokens, outs = _generate(llm, _prompts(), GREEDY)
    assert tokens == baselines[family]
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_pool_intact(llm)
    stats = llm.engine.scheduler.spec_decode_stats
    assert stats.num_draft_tokens == sum(o.num_draft_tokens for o in outs) > 0
    assert stats.num_accepted_tokens == sum(o.num_accepted_draft_tokens for o in outs)
    load = llm.engine.get_load()
    assert load["spec_decode_acceptance_rate"] == pytest.approx(stats.num_accepted_tokens / stats.num_draft_tokens)
    assert 1.0 <= load["spec_decode_mean_accepted_length"] <= 1 + llm.engine.args.num_speculative_tokens
    if draft == "self":
        assert stats.acceptance_rate > 0.9
    elif draft == "unrelated":
        assert stats.acceptance_rate < 0.2
    elif draft == "ngram":
        assert stats.num_accepted_tokens > 0  # the repeated prompt is found


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_logprobs_are_those_of_decoding_without_drafts(draft: str, tiny_models, drafts) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    _, plain = _generate(LLM(str(tiny_models["qwen2"]), **PRESSURE), _prompts(), params)
    _, spec = _generate(_speculative("qwen2", draft, tiny_models, drafts), _prompts(), params)
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids
        assert b.logprobs is not None and len(b.logprobs) == len(b.token_ids)
        for entry_a, entry_b in zip(a.logprobs, b.logprobs, strict=True):
            assert entry_a.keys() == entry_b.keys()
            for tid in entry_a:
                assert entry_b[tid].logprob == pytest.approx(entry_a[tid].logprob, abs=1e-4)
                assert entry_b[tid].rank == entry_a[tid].rank
    assert sum(o.num_accepted_draft_tokens for o in spec) > 0


def test_preemption_mid_speculation_recomputes_the_same_tokens(tiny_models, drafts) -> None:
    """Four long requests in a cache that holds two: the newest is preempted while its drafts
    are in flight (their lookahead slots freed with its blocks), and later resumes drafting from
    a draft KV cache rebuilt from scratch. (Found by trying block sizes and k: a request at a
    block boundary gets no lookahead block, and the one preempted for it still has its drafts.)"""
    prompts = [[5, 9, 200, 31, 7, 88, 41, 3], [61, 17, 230, 9, 12, 300, 4, 77], [8, 8, 100], [400, 2, 3, 99, 5]]
    args = dict(block_size=16, max_model_len=64, num_kv_blocks=9, max_num_seqs=4, num_speculative_tokens=2,
                speculative_disable_batch_size=None)
    params = SamplingParams(temperature=0.0, max_tokens=52, ignore_eos=True, detokenize=False)
    expected, _ = _generate(LLM(str(tiny_models["llama"]), **args), prompts, params)
    llm = LLM(str(tiny_models["llama"]), speculative_model=str(drafts["llama"]["self"]), **args)
    scheduler = llm.engine.scheduler
    preempted_with_drafts: list[str] = []
    schedule = scheduler.schedule

    def spying_schedule():
        had_drafts = {r.request_id for r in scheduler.running if r.spec_token_ids}
        output = schedule()
        preempted_with_drafts.extend(set(output.preempted_request_ids) & had_drafts)
        return output

    scheduler.schedule = spying_schedule
    tokens, outs = _generate(llm, prompts, params)
    assert tokens == expected
    assert preempted_with_drafts
    assert scheduler.spec_decode_stats.acceptance_rate > 0.9  # the rebuilt draft KV is right again
    _assert_pool_intact(llm)


def _hf_greedy(model: torch.nn.Module, tokens: list[int], n: int) -> list[int]:
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[-n:]


def _draft_proposer(target: Path, draft: Path, confidence: float = 0.0) -> DraftModelProposer:
    """A draft model proposer; ``confidence``: its draft_confidence_threshold (0: always k drafts)."""
    args = EngineArgs(model=str(target), speculative_model=str(draft), block_size=BLOCK_SIZE, max_model_len=128,
                      draft_confidence_threshold=confidence)
    config = load_draft_config(args, ModelConfig.from_pretrained(target, max_model_len=128))
    proposer = DraftModelProposer(config, args, TorchAttentionBackend(), eos_token_ids=[1])
    proposer.load_model()
    proposer.initialize_kv_cache(num_blocks=80)
    return proposer


def test_draft_model_drafts_its_greedy_continuation_through_partial_acceptance(tiny_models) -> None:
    """Drafts equal transformers' greedy continuation of the draft model, round after round of
    accepting a random number of them and a correction: the draft KV it keeps (the accepted
    drafts' and the catch-up's) is right, and after a preemption (other blocks) it starts over."""
    target, draft = tiny_models["llama"], tiny_models["qwen3"]  # another family, the same vocabulary
    proposer = _draft_proposer(target, draft)
    hf = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    rng = random.Random(3)
    prompt = [rng.randrange(2, 500) for _ in range(11)]
    output: list[int] = []
    table, num_preemptions = list(range(1, 33)), 0
    for round_ in range(10):
        if round_ == 6:  # preempted: its blocks are others now, whose draft KV is stale
            table, num_preemptions = list(range(40, 72)), num_preemptions + 1
        k = rng.randint(1, 4)
        proposal = proposer.propose([DraftRequest("a", prompt, output, k, GREEDY, table, num_preemptions)])
        expected = _hf_greedy(hf, prompt + output, k)
        assert proposal.draft_token_ids == [expected], f"round {round_}"
        assert proposal.draft_probs is None  # greedy: no distribution to verify against
        accepted = rng.randint(0, k)
        output.extend(expected[:accepted] + [rng.randrange(2, 500)])


def test_drafting_stops_after_a_draft_below_the_confidence_threshold(tiny_models) -> None:
    """Drafts are transformers' greedy continuation of the draft model up to and including the
    first whose probability (softmax of the draft's logits, float32) is below the threshold;
    per request, in one batch."""
    target, draft = tiny_models["llama"], tiny_models["qwen3"]
    hf = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    rng = random.Random(11)
    prompts = [[rng.randrange(2, 500) for _ in range(n)] for n in (7, 12, 9)]
    continuations = []
    for prompt in prompts:
        tokens, confidences = list(prompt), []
        with torch.no_grad():
            for _ in range(4):
                probs = hf(torch.tensor([tokens])).logits[0, -1].softmax(-1)
                confidences.append(float(probs.max()))
                tokens.append(int(probs.argmax()))
        continuations.append((tokens[len(prompt):], confidences))
    everything = sorted(c for _, confs in continuations for c in confs)
    threshold = everything[len(everything) // 2]  # about half the drafts fall below it
    expected = []
    for tokens, confs in continuations:
        below = [j for j, c in enumerate(confs) if c < threshold]
        expected.append(tokens[:below[0] + 1] if below else tokens)
    assert any(len(e) < 4 for e in expected) and any(len(e) > 1 for e in expected)
    proposer = _draft_proposer(target, draft, confidence=threshold)
    proposal = proposer.propose([DraftRequest(f"r{i}", p, [], 4, GREEDY, list(range(1 + 8 * i, 9 + 8 * i)))
                                 for i, p in enumerate(prompts)])
    assert proposal.draft_token_ids == expected
    assert _draft_proposer(target, draft).propose(
        [DraftRequest("a", prompts[0], [], 4, GREEDY, list(range(1, 9)))]).draft_token_ids == [continuations[0][0]]


def test_greedy_drafts_apply_the_sampling_parameters_of_rows_that_need_them(tiny_models) -> None:
    """Greedy drafts come from the raw logits' argmax only while no row of the batch changes its
    logits: a biased greedy row beside a plain one still gets its bias, the plain one the draft's
    greedy continuation, alone or not."""
    target, draft = tiny_models["llama"], tiny_models["qwen3"]
    proposer = _draft_proposer(target, draft)
    hf = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 500) for _ in range(9)] for _ in range(2)]
    biased = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False, logit_bias={7: 100.0})
    plain_alone = proposer.propose([DraftRequest("p", prompts[0], [], 4, GREEDY, list(range(1, 9)))])
    together = proposer.propose([DraftRequest("q", prompts[0], [], 4, GREEDY, list(range(9, 17))),
                                 DraftRequest("b", prompts[1], [], 4, biased, list(range(17, 25)))])
    expected = _hf_greedy(hf, prompts[0], 4)
    assert plain_alone.draft_token_ids == [expected]
    assert together.draft_token_ids == [expected, [7] * 4]
    assert together.draft_probs is None


def test_a_draft_with_another_vocabulary_is_refused(tiny_models, tmp_path: Path) -> None:
    other = shutil.copytree(tiny_models["llama"], tmp_path / "big-vocab")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 600}))
    with pytest.raises(ValueError, match="speculative_model.*vocabulary of 600 tokens"):
        LLMEngine(EngineArgs(model=str(tiny_models["llama"]), speculative_model=str(other), max_model_len=64,
                             num_kv_blocks=32))


def test_kv_budget_pays_for_both_models(tiny_models) -> None:
    target, draft = tiny_models["llama"], tiny_models["qwen3"]
    budget = int(0.001 * 2**30)
    engine = LLMEngine(EngineArgs(model=str(target), speculative_model=str(draft), cpu_kv_cache_gb=0.001,
                                  max_model_len=64))
    block_bytes = kv_block_bytes(engine.model_config, 16) + kv_block_bytes(engine.proposer.config, 16)
    assert kv_block_bytes(engine.proposer.config, 16) != kv_block_bytes(engine.model_config, 16)
    assert engine.num_kv_blocks == budget // block_bytes
    # One pool of block ids, two caches: the draft's has as many blocks as the target's.
    assert engine.proposer.kv_caches[0][0].shape[0] == engine.num_kv_blocks == engine.runner.kv_caches[0][0].shape[0]
    assert engine.runner.graphs is None and engine.proposer.graphs is None  # no CUDA graph code on CPU


# ---------------------------------------------------------------------------- sampling
NUM_RUNS = 3000
ALPHA = 1e-3
SHIFT = 0.1  # total variation towards the draft's law the test must detect with power >= 0.99


def _first_three_law(path: Path, prompt: list[int], temperature: float, top_k: int) -> dict[tuple[int, ...], float]:
    """The exact law of the first three tokens sampled with ``temperature`` and ``top_k``, from
    transformers' logits in float64."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

    def next_law(tokens: list[int]) -> dict[int, float]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1] / temperature
        top = logits.topk(top_k)
        probs = top.values.softmax(dim=-1)
        return dict(zip(top.indices.tolist(), probs.tolist(), strict=True))

    law: dict[tuple[int, ...], float] = {}
    for a, pa in next_law([]).items():
        for b, pb in next_law([a]).items():
            for c, pc in next_law([a, b]).items():
                law[(a, b, c)] = pa * pb * pc
    return law


def test_sampled_first_three_tokens_follow_the_target_law(tiny_models, drafts, tokenizer_dir: Path,
                                                           tmp_path: Path) -> None:
    """3000 seeded runs, temperature 0.8 and top-k 3 (27 outcomes for the first three tokens),
    with a draft model whose drafts are accepted about half the time (tokens 2 and 3 come from
    verify steps: accepted drafts, corrections from the residual, bonus tokens), and without
    speculation. Chi-square goodness of fit to the exact law at significance 1e-3; the test
    first asserts it would detect, with power >= 0.99, an output law moved by 0.1 in total
    variation towards the draft's own law (what verifying too leniently produces)."""
    target = tiny_models["llama"]
    draft = _noisy_copy(target, tmp_path / "noisier", 0.05)
    prompt = [5, 6, 7, 8]
    temperature, top_k = 0.8, 3
    law = _first_three_law(target, prompt, temperature, top_k)
    draft_law = _first_three_law(draft, prompt, temperature, top_k)
    outcomes = sorted(set(law) | set(draft_law))
    expected = np.array([law.get(o, 0.0) for o in outcomes])
    towards = np.array([draft_law.get(o, 0.0) for o in outcomes])
    keep = expected > 0
    tv = 0.5 * np.abs(towards - expected).sum()
    assert tv > SHIFT
    shifted = expected + SHIFT * (towards - expected) / tv
    df = int(keep.sum()) - 1
    noncentrality = NUM_RUNS * (((shifted - expected)[keep] ** 2) / expected[keep]).sum()
    assert ncx2.sf(chi2.ppf(1 - ALPHA, df), df, noncentrality) >= 0.99

    params = [SamplingParams(temperature=temperature, top_k=top_k, seed=i, max_tokens=4, ignore_eos=True,
                             detokenize=False) for i in range(NUM_RUNS)]
    engine_args = dict(max_model_len=32, max_num_seqs=256, num_kv_blocks=256 * 3, seed=1)
    for speculative in ({}, {"speculative_model": str(draft), "speculative_disable_batch_size": None}):
        llm = LLM(str(target), **engine_args, **speculative)
        tokens, _ = _generate(llm, [prompt] * NUM_RUNS, params)
        counts = {o: 0 for o in outcomes}
        for t in tokens:
            counts[tuple(t[:3])] += 1
        observed = np.array([counts[o] for o in outcomes])
        assert observed[~keep].sum() == 0, "a token outside the top-k was sampled"
        assert chisquare(observed[keep], expected[keep] * NUM_RUNS).pvalue > ALPHA, speculative
        if speculative:
            stats = llm.engine.scheduler.spec_decode_stats
            assert 0.2 < stats.acceptance_rate < 0.9  # rejections and resamples happened


def test_seeded_sampling_with_a_draft_is_reproducible_whatever_the_batch(tiny_models, drafts) -> None:
    target = tiny_models["llama"]
    llm = LLM(str(target), speculative_model=str(drafts["llama"]["noisy"]), max_model_len=64, num_kv_blocks=64,
              speculative_disable_batch_size=None)
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=20, ignore_eos=True)
    alone, _ = _generate(llm, [[3, 4, 5, 6]], seeded)
    others = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    together, _ = _generate(llm, [[9, 9, 2], [3, 4, 5, 6], [7, 300]], [others, seeded, others])
    assert together[1] == alone[0]
    assert llm.engine.scheduler.spec_decode_stats.num_accepted_tokens > 0


# ---------------------------------------------------------------------------- who drafts
def test_an_opted_out_request_gets_no_drafts(tiny_models, drafts, baselines) -> None:
    llm = _speculative("llama", "self", tiny_models, drafts)
    opted_out = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False,
                               speculative_decoding=False)
    params = [GREEDY, opted_out] * 3
    tokens, outs = _generate(llm, _prompts(), params)
    assert tokens == baselines["llama"]
    assert [o.num_draft_tokens > 0 for o in outs] == [True, False] * 3
    with pytest.raises(ValueError, match="speculative_decoding must be a bool"):
        SamplingParams(speculative_decoding="no")  # type: ignore[arg-type]


def test_speculation_is_off_while_more_requests_run_than_the_switch_off_size(tiny_models, drafts) -> None:
    llm = LLM(str(tiny_models["llama"]), speculative_model=str(drafts["llama"]["self"]), max_model_len=64,
              num_kv_blocks=64, speculative_disable_batch_size=2)
    engine = llm.engine
    seen: list[tuple[int, bool]] = []
    propose = engine._propose_drafts

    def spying_propose(updates):
        propose(updates)
        seen.append((engine.scheduler.num_running, any(r.spec_token_ids for r in engine.scheduler.running)))

    engine._propose_drafts = spying_propose
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (10, 20, 30, 40)]
    tokens, outs = _generate(llm, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], params)
    assert not any(drafted for running, drafted in seen if running > 2)
    assert any(drafted for running, drafted in seen if running <= 2)
    # The first two finish while four, then three, run: they never drafted.
    assert [o.num_draft_tokens > 0 for o in outs] == [False, False, True, True]
    expected, _ = _generate(LLM(str(tiny_models["llama"]), max_model_len=64, num_kv_blocks=64),
                            [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], params)
    assert tokens == expected


def test_a_request_whose_drafts_keep_failing_pauses_drafting(tiny_models, drafts) -> None:
    """A window of failed verify steps (>= 9 tokens), a pause of FIRST_PAUSE steps, a second
    failed window (>= 8 more tokens, by token 60 at the latest), then a pause of twice that: exactly
    two windows' drafts in 60 tokens (k drafts a step: no confidence threshold)."""
    llm = _speculative("llama", "unrelated", tiny_models, drafts, draft_confidence_threshold=0.0)
    tokens, (out,) = _generate(llm, [[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    k = llm.engine.args.num_speculative_tokens
    assert out.num_draft_tokens == 2 * policy.WINDOW * k
    assert out.num_accepted_draft_tokens < policy.MIN_ACCEPTANCE * out.num_draft_tokens


def test_switch_off_rule_looks_at_the_last_window_of_verify_steps() -> None:
    rule = SpeculationPolicy(disable_batch_size=8)
    assert rule.allows_batch(8) and not rule.allows_batch(9) and SpeculationPolicy(None).allows_batch(10**6)
    for _ in range(policy.WINDOW - 1):
        rule.record("a", 4, 0)
    assert rule.allows("a")  # too few steps to judge
    rule.record("a", 4, 0)
    assert [rule.allows("a") for _ in range(policy.FIRST_PAUSE + 1)] == [False] * policy.FIRST_PAUSE + [True]
    for _ in range(policy.WINDOW - 1):  # a fresh window after the pause
        rule.record("a", 4, 0)
    assert rule.allows("a")
    rule.record("a", 4, 0)  # failed again: twice the pause
    assert [rule.allows("a") for _ in range(2 * policy.FIRST_PAUSE + 1)] == [False] * 2 * policy.FIRST_PAUSE + [True]
    for accepted in [4] + [0] * (policy.WINDOW - 1):  # 4 of 32 = 0.125 >= 0.1: keeps drafting
        rule.record("b", 4, accepted)
    assert rule.allows("b")
    rule.record("b", 4, 0)  # the accepted step leaves the window: 0 of 32
    assert not rule.allows("b")
    rule.record("a", 4, 0)
    rule.finish_requests(["a", "b"])
    assert rule.allows("a") and rule.allows("b")


def test_ngram_pauses_a_request_only_after_a_window_without_an_accepted_draft() -> None:
    """N-gram drafts cost nothing to make: one accepted draft in 16 verify steps keeps a request
    drafting; 16 steps without one pause it, as the engine wires the rule in."""
    rule = NGRAM_PAUSE_RULE
    assert (rule.window, rule.first_pause) == (16, 32) and 0 < rule.min_acceptance * rule.window * 4 < 1
    check = SpeculationPolicy(None, NgramProposer(1, 4).pause_rule)
    for accepted in [1] + [0] * (rule.window - 1):  # 1 of 64: 1.6% > 1%, keeps drafting
        check.record("a", 4, accepted)
    assert check.allows("a")
    check.record("a", 4, 0)  # the accepted step leaves the window: none accepted in 16
    assert [check.allows("a") for _ in range(rule.first_pause + 1)] == [False] * rule.first_pause + [True]
    # The default rule (a draft model's) pauses the same history after 8 steps.
    default = SpeculationPolicy(None)
    for accepted in [3] + [0] * (policy.WINDOW - 1):  # 3 of 32 < 10%
        default.record("b", 4, accepted)
    assert not default.allows("b")


def test_engine_takes_the_proposers_pause_rule(tiny_models) -> None:
    ngram = LLMEngine(EngineArgs(model=str(tiny_models["llama"]), speculative_method="ngram", max_model_len=64,
                                 num_kv_blocks=64))
    assert ngram.speculation.rule == NGRAM_PAUSE_RULE
    plain = LLMEngine(EngineArgs(model=str(tiny_models["llama"]), max_model_len=64, num_kv_blocks=64))
    assert plain.speculation.rule == policy.PauseRule()


# ---------------------------------------------------------------------------- step inputs
def test_verify_step_takes_logits_at_its_last_k_plus_one_tokens() -> None:
    buffers = InputBuffers(max_tokens=32, max_reqs=4, max_blocks=4, block_size=4, device=torch.device("cpu"))
    scheduled = [
        ScheduledRequest("chunk", [1, 2, 3], 0, [1], False, GREEDY, [1, 2, 3, 4], []),
        ScheduledRequest("verify", [7, 8, 9], 5, [2, 3], True, GREEDY, [5] * 5, [7], [8, 9]),
        ScheduledRequest("decode", [4], 2, [5], True, GREEDY, [1, 2], [4]),
    ]
    assert buffers.prepare(scheduled).logits_indices.tolist() == [3, 4, 5, 6]


def test_graph_padding_of_a_verify_step() -> None:
    """Two requests verifying 2 drafts each, padded to a graph of 4 requests x 3 tokens: the
    padding writes nowhere (slot -1) and keeps 3 tokens per request, with a KV length that covers
    them (no negative context for the prefill kernels)."""
    buffers = InputBuffers(max_tokens=32, max_reqs=4, max_blocks=4, block_size=4, device=torch.device("cpu"))
    tables = [[1, 2, 3], [4, 5, 6]]
    scheduled = [ScheduledRequest(f"r{i}", [5, 6, 7], 6 + i, tables[i], True, GREEDY, [1] * 7, [5], [6, 7])
                 for i in range(2)]
    inputs = buffers.prepare(scheduled, graph_shape=GraphShape(4, 3))
    metadata = inputs.metadata
    assert inputs.input_ids.tolist() == [5, 6, 7] * 2 + [0] * 6
    assert inputs.positions.tolist() == [6, 7, 8, 7, 8, 9] + [0] * 6
    # r0 at positions 6..8 of blocks [1, 2, 3], r1 at 7..9 of [4, 5, 6]; block_size 4.
    assert metadata.slot_mapping.tolist() == [10, 11, 12, 23, 24, 25] + [-1] * 6
    assert metadata.query_start_loc.tolist() == [0, 3, 6, 9, 12]
    assert metadata.seq_lens.tolist() == [9, 10, 3, 3]
    assert metadata.decode_order.tolist() == [1, 0, 2, 3]  # longest first, padding last
    assert (metadata.max_query_len, metadata.max_seq_len) == (3, 16)
    with pytest.raises(AssertionError, match="does not fit the graph"):
        buffers.prepare([*scheduled[:1], ScheduledRequest("d", [5], 3, [1], True, GREEDY, [1] * 3, [5])],
                        graph_shape=GraphShape(4, 3))


# ---------------------------------------------------------------------------- configuration and API
@pytest.mark.parametrize(("changes", "message"), [
    ({"speculative_method": "medusa"}, "speculative_method must be one of ngram, draft"),
    ({"speculative_method": "draft"}, "needs speculative_model"),
    ({"speculative_method": "ngram", "speculative_model": "x"}, "speculative_model is for"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be >= 1"),
    ({"ngram_prompt_lookup_min": 3, "ngram_prompt_lookup_max": 2}, "ngram_prompt_lookup_min <= ngram_prompt_lookup_"),
    ({"speculative_disable_batch_size": 0}, "speculative_disable_batch_size must be >= 1"),
])
def test_bad_speculative_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineArgs(model="m", **changes)


def test_speculative_settings_from_the_command_line() -> None:
    args = engine_args_of(build_parser().parse_args(
        ["serve", "--model", "m", "--speculative-model", "default", "--num-speculative-tokens", "3",
         "--speculative-disable-batch-size", "16"]))
    assert (args.speculative_method, args.speculative_model) == ("draft", str(DEFAULT_DRAFT_MODEL))
    assert DEFAULT_DRAFT_MODEL.is_dir()
    assert (args.num_speculative_tokens, args.speculative_disable_batch_size) == (3, 16)
    ngram = engine_args_of(build_parser().parse_args(
        ["serve", "--model", "m", "--speculative-method", "ngram", "--ngram-prompt-lookup-max", "6"]))
    assert (ngram.speculative_method, ngram.ngram_prompt_lookup_max, ngram.speculative_model) == ("ngram", 6, None)
    assert not EngineArgs(model="m").speculative


def test_usage_reports_drafts_verified_and_accepted_per_choice() -> None:
    def delta(index: int, tokens: list[int], drafts: int, accepted: int, finish: str | None) -> RequestOutput:
        return RequestOutput("r", None, [1, 2], [CompletionOutput(index, "", tokens, finish_reason=finish,
                                                                  num_draft_tokens=drafts,
                                                                  num_accepted_draft_tokens=accepted)],
                             finished=finish is not None)

    stream = types.SimpleNamespace(num_top_logprobs=0, num_output_tokens=[6, 2])
    # A slow reader's deltas coalesce: the last counts are the choice's totals.
    merged = coalesce([delta(0, [5], 0, 0, None), delta(0, [6, 7, 8], 4, 2, None), delta(0, [9], 8, 3, "length")])
    (last,) = responses_of(merged, stream)
    assert (last.usage.draft_tokens, last.usage.accepted_draft_tokens) == (8, 3)
    (ongoing,) = responses_of(delta(1, [3], 4, 4, None), stream)
    assert not ongoing.HasField("usage")


def test_grpc_usage_and_load_report_speculation(service_model: Path, tmp_path: Path) -> None:
    """A real ``sluice serve --speculative-model``: the final message's usage counts the choice's
    drafts (none for a request that opts out) and GetLoad the acceptance since start-up; the
    tokens are those of the engine without speculation."""
    metrics_port = free_port()
    server = start_server(service_model, tmp_path, "--num-kv-blocks", "64", "--max-model-len", "256",
                          "--speculative-model", str(service_model), "--metrics-port", str(metrics_port))
    try:
        wait_until_serving(server)
        prompt = [5, 6, 7, 8, 9]
        with SluiceClient(server.address, timeout=60) as client:
            finals = {}
            tokens = {}
            for opt_in in (True, False):
                deltas = list(client.generate(prompt, temperature=0.0, max_tokens=30, ignore_eos=True,
                                              speculative_decoding=opt_in))
                tokens[opt_in] = [t for d in deltas for t in d.token_ids]
                finals[opt_in] = deltas[-1]
            load = client.load()
        deadline = time.monotonic() + 10
        while True:  # the engine's load snapshot behind /metrics refreshes on a timer
            metrics = scrape_metrics(metrics_port)
            if metrics["sluice:spec_decode_num_draft_tokens_total"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        server.stop()
    expected, _ = _generate(LLM(str(service_model), num_kv_blocks=64, max_model_len=256), [prompt],
                            SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    assert tokens[True] == tokens[False] == expected[0]
    usage = finals[True].usage
    assert usage.draft_tokens > 0 and 0 < usage.accepted_draft_tokens <= usage.draft_tokens
    assert (finals[False].usage.draft_tokens, finals[False].usage.accepted_draft_tokens) == (0, 0)
    assert load.spec_decode_acceptance_rate == pytest.approx(usage.accepted_draft_tokens / usage.draft_tokens)
    assert 1.0 < load.spec_decode_mean_accepted_length <= 5.0
    # Prometheus: the same totals (the load snapshot refreshes on a timer, so at most behind).
    drafted = metrics["sluice:spec_decode_num_draft_tokens_total"]
    accepted = metrics["sluice:spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted <= drafted <= usage.draft_tokens


def test_aborted_request_reports_its_drafts(tiny_models, drafts) -> None:
    llm = _speculative("llama", "self", tiny_models, drafts)
    engine = llm.engine
    engine.add_request("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    while engine.scheduler.spec_decode_stats.num_draft_tokens == 0:
        engine.step()
    request = engine.scheduler.get_request("r")
    assert request is not None and request.status == RequestStatus.RUNNING
    engine.abort_request("r")
    (final,) = [c for out in engine.step() for c in out.outputs if c.finish_reason == "abort"]
    assert final.num_draft_tokens == request.num_draft_tokens > 0
    assert final.num_accepted_draft_tokens == request.num_accepted_draft_tokens
    _assert_pool_intact(llm)

