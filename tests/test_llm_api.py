"""The offline API: input validation, sampling against the model's distribution, seeds, n, stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), block_size=4, num_kv_blocks=512, max_model_len=128, max_num_seqs=64)


def _assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.get_num_unfinished_requests() == 0
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_total_blocks
    engine.scheduler.check_integrity()


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([5, 99999], SamplingParams(), "token id"),
        ([5, -1], SamplingParams(), "token id"),
        ("hello", SamplingParams(max_tokens=500), "max_tokens"),
        ("hello", SamplingParams(max_tokens=127), "max_model_len"),
    ],
)
def test_bad_prompt_is_rejected_and_nothing_is_admitted(llm: LLM, prompt, params, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate(["a fine prompt", prompt], params)
    _assert_idle(llm)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_out_of_vocabulary_logit_bias_is_rejected(llm: LLM) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("hello", SamplingParams(logit_bias={10**6: 1.0}))
    _assert_idle(llm)


def test_unknown_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        LLM(str(tmp_path / "missing"))


def test_first_token_distribution_matches_softmax(llm: LLM, llama_dir: Path) -> None:
    prompt = [5, 17, 42, 7]
    draws = 3000
    params = [SamplingParams(temperature=1.0, max_tokens=1, seed=s) for s in range(draws)]
    outputs = llm.generate([prompt] * draws, params)
    counts = torch.zeros(512)
    for o in outputs:
        counts[o.outputs[0].token_ids[0]] += 1
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    expected = probs * draws
    big = expected >= 5  # pool rare tokens into one bin so the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    assert big.sum() >= 3
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    _assert_idle(llm)


def test_seeded_request_is_identical_alone_and_in_a_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([[3, 4, 5, 6]], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True) for _ in range(7)]
    batch = llm.generate([[9, 8, 7]] * 3 + [[3, 4, 5, 6]] + [[11, 12]] * 4, others[:3] + [params] + others[3:])
    assert batch[3].outputs[0].token_ids == alone


def test_n_choices_are_indexed_and_differ(llm: LLM) -> None:
    out = llm.generate("def f(x):", SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    _assert_idle(llm)


def test_stop_string_is_excluded_and_stop_token_reported(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = llm.generate("import os", greedy)[0].outputs[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = llm.generate("import os", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    c = cut.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full.text[: full.text.index(stop)]
    tok = full.token_ids[3]
    by_id = llm.generate("import os", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[tok]))[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tok
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]
    _assert_idle(llm)


def test_min_tokens_suppresses_eos(llm: LLM) -> None:
    eos = llm.engine.tokenizer.eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6, logit_bias={eos: 100.0})
    out = llm.generate("x", params)[0].outputs[0]
    assert len(out.token_ids) == 6 and eos not in out.token_ids
    early = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=6, logit_bias={eos: 100.0}))[0].outputs[0]
    assert early.token_ids == [eos] and early.finish_reason == "stop"


def test_n_choices_share_the_prompt_blocks(llm: LLM) -> None:
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15]  # two full blocks of 4, then one token
    before = llm.engine.scheduler.stats().prefix_cache_hits
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0.8, max_tokens=5, seed=3, ignore_eos=True))[0]
    assert all(len(c.token_ids) == 5 for c in out.outputs)
    # Choices 1 and 2 start from choice 0's two cached prompt blocks.
    assert llm.engine.scheduler.stats().prefix_cache_hits - before == 2 * 8
    _assert_idle(llm)


def test_full_queue_admits_no_choice(llama_dir: Path) -> None:
    from scheduler.scheduler import QueueFullError

    llm = LLM(str(llama_dir), block_size=4, num_kv_blocks=64, max_model_len=64, max_waiting_requests=2)
    engine = llm.engine
    engine.add_request("a", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        engine.add_request("b", [5, 6], SamplingParams(n=2, max_tokens=2))
    assert engine.scheduler.get_num_unfinished_requests() == 1
    while engine.has_unfinished_requests():
        engine.step()
    _assert_idle(llm)
