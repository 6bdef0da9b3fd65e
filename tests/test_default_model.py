"""The bundled default model (models/sluice-pycoder, AWQ 4-bit): it loads as AWQ, its perplexity
through sluice equals ``transformers``' on the same weights dequantized, it completes held-out
function headers into Python that parses, and ``sluice generate`` uses it when no --model is given."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from models.corpus import split_of, stdlib_root
from models.dense_checkpoint import dequantized_state_dict, save_dense_checkpoint
from models.evaluate import heldout_windows, read_files, sluice_perplexity, transformers_perplexity
from models.header_completion import complete_headers, function_headers, function_text, parses
from service import cli

BUNDLED = cli.DEFAULT_MODEL
# Held-out (never trained on) files present in the stdlib of Python 3.11 and 3.12.
HELDOUT_FILES = ("operator.py", "runpy.py", "sysconfig.py", "modulefinder.py", "multiprocessing/util.py",
                 "importlib/machinery.py")
# Measured: 3 of these 6 headers' completions parse (7 of all 12 held-out headers; models/README.md).
PARSE_RATE_FLOOR = 0.5


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(BUNDLED), num_kv_blocks=64, max_model_len=512)


def test_heldout_files_are_heldout() -> None:
    for f in HELDOUT_FILES:
        assert split_of(f) == "heldout", f
        assert (stdlib_root() / f).is_file(), f


def test_bundled_target_loads_as_awq_and_writes_python(llm: LLM) -> None:
    config = llm.engine.model_config
    assert config.quantization_config["quant_method"] == "awq"
    assert config.quantization_config["bits"] == 4
    out = llm.generate(["def add(a, b):"], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    # A trained model goes on to an indented body; random weights would not.
    assert out.text.startswith("\n    "), repr(out.text)
    assert parses(function_text("def add(a, b):", out.text, truncated=True)), repr(out.text)


def test_perplexity_through_sluice_equals_transformers_on_dequantized_weights(tmp_path: Path) -> None:
    windows = heldout_windows(BUNDLED, read_files(HELDOUT_FILES[:2]))[:2]
    dense = save_dense_checkpoint(dequantized_state_dict(BUNDLED), BUNDLED, tmp_path / "dense")
    ours, oracle = sluice_perplexity(BUNDLED, windows), transformers_perplexity(dense, windows)
    assert ours.tokens == oracle.tokens == 1024
    assert abs(ours.ppl - oracle.ppl) / oracle.ppl < 1e-3
    # Trained: far below the unigram perplexity of the held-out text (812 in training's report).
    assert ours.ppl < 60


def test_dequantized_weights_are_the_awq_ones() -> None:
    state = dequantized_state_dict(BUNDLED)
    w = state["model.layers.0.mlp.down_proj.weight"]
    assert w.shape == (512, 1536) and w.dtype == torch.float32
    # 4-bit: each group of 128 inputs of one output row holds at most 16 distinct values.
    assert all(len(torch.unique(g)) <= 16 for row in w[:4] for g in row.split(128))


def test_completions_of_heldout_headers_parse(llm: LLM) -> None:
    headers = [h for text in read_files(HELDOUT_FILES) for h in function_headers(text, 1)]
    assert len(headers) == len(HELDOUT_FILES)
    texts = complete_headers(llm, headers, max_tokens=96)
    assert sum(parses(t) for t in texts) / len(texts) >= PARSE_RATE_FLOOR, texts


def test_function_text_cuts_at_dedent_and_fills_empty_bodies() -> None:
    assert function_text("def f():", "\n    return 1\n\ndef g():\n    pass\n", False) == "def f():\n    return 1\n\n"
    assert function_text("def f():", "\n\nclass A:\n", False) == "def f():\n    pass\n"
    assert function_text("def f(", "x):\n    x = 1\n    y = (", True) == "def f(x):\n    x = 1\n"
    assert not parses("def f():\n    return (\n")


def test_generate_without_model_uses_the_bundled_model(llm: LLM, monkeypatch, capsys) -> None:
    prompt = "import os\n"
    expected = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].text
    monkeypatch.setattr(sys, "argv", ["sluice"])
    rc = cli.main(["generate", prompt, "--max-tokens", "8", "--temperature", "0", "--num-kv-blocks", "32",
                   "--max-model-len", "256"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert str(BUNDLED) in captured.err  # the CLI logs which model it chose to stderr


def test_serve_without_model_defaults_to_the_bundled_model() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert cli.engine_args_of(args).model == str(BUNDLED)
    assert cli.engine_args_of(cli.build_parser().parse_args(["serve", "--model", "m"])).model == "m"


# Measured: 289 of 362 drafts (0.80) on these four; 0.61 over all 22 held-out prompts x 128 tokens (k = 4,
# models/README.md, bench/results/spec_decode_cpu.json).
DRAFT_ACCEPTANCE_FLOOR = 0.6


def test_bundled_draft_guesses_what_the_target_writes(llm: LLM) -> None:
    """``speculative_model="default"`` (the bundled draft), greedy, k = 4: the output is the
    target's own, and the target accepts most of the draft's guesses on held-out code."""
    spec = LLM(str(BUNDLED), num_kv_blocks=128, max_model_len=512, speculative_model="default",
               num_speculative_tokens=4)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(text)[:160] for text in read_files(HELDOUT_FILES[:4])]
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    outs = [o.outputs[0] for o in spec.generate(prompts, params)]
    assert [o.token_ids for o in outs] == expected
    drafted, accepted = sum(o.num_draft_tokens for o in outs), sum(o.num_accepted_draft_tokens for o in outs)
    print(f"draft acceptance {accepted}/{drafted} = {accepted / drafted:.3f}")
    assert drafted >= 4 * 40 and accepted / drafted >= DRAFT_ACCEPTANCE_FLOOR, (accepted, drafted)
