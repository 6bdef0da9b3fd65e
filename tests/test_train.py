"""models/train.py: the bundled model pair's training script, run end to end with tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer
from models.corpus import SPLITS, load_corpus, source_files, split_of, stdlib_root
from models.train import (
    DRAFT_NAME,
    MIN_LR_RATIO,
    SHAPES,
    TARGET_NAME,
    build_model,
    evaluate,
    lr_at,
    main,
    sample_batch,
    unigram_nll,
)

MODELS = (TARGET_NAME, DRAFT_NAME)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run faster on one thread, and do not slow down when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    """The same tiny training run twice, into two directories."""
    dirs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    return [(d, main(["--out", str(d), "--tiny", "--seed", "3"])) for d in dirs]


def test_training_loss_decreases(runs) -> None:
    _, report = runs[0]
    for name in MODELS:
        curve = [loss for _, loss in report["models"][name]["loss_curve"]]
        assert curve[0] < math.log(report["vocab_size"]) + 0.5  # starts near uniform
        assert curve[-1] < curve[0] - 0.5
        val = [loss for _, loss in report["models"][name]["val_curve"]]
        assert min(val) < curve[0]


def test_report_has_every_field(runs) -> None:
    _, report = runs[0]
    for key in ("command", "seed", "python_version", "corpus", "vocab_size", "models", "steps", "tokens_seen",
                "unigram_heldout_ppl", "draft_target_greedy_agreement", "wall_time_s", "device",
                "torch_version", "timings"):
        assert key in report, key
    assert report["seed"] == 3 and report["steps"] == 20 and report["vocab_size"] == 300
    assert report["tokens_seen"] == 20 * 8 * 64
    assert set(report["corpus"]["files"]) == set(SPLITS) and all(report["corpus"]["tokens"].values())
    for name in MODELS:
        m = report["models"][name]
        assert m["params"] > 0 and math.isfinite(m["final_train_loss"])
        assert m["heldout_ppl"] == pytest.approx(math.exp(m["heldout_nll"]))
    assert 0.0 <= report["draft_target_greedy_agreement"] <= 1.0


def test_heldout_files_are_disjoint_from_training(runs) -> None:
    out, report = runs[0]
    heldout = (out / "heldout_files.txt").read_text().split()
    validation = (out / "validation_files.txt").read_text().split()
    train = load_corpus(max_files=30).paths["train"]
    assert heldout and validation and len(train) == 30
    assert report["corpus"]["files"] == {"train": 30, "validation": len(validation), "heldout": len(heldout)}
    assert not set(heldout) & set(train) and not set(validation) & set(train)
    assert all(split_of(p) == "heldout" for p in heldout)
    assert all(split_of(p) == "validation" for p in validation)


def test_same_seed_gives_identical_weights(runs) -> None:
    (a, _), (b, _) = runs
    for name in MODELS:
        assert (a / name / "tokenizer.json").read_bytes() == (b / name / "tokenizer.json").read_bytes()
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key


def test_checkpoint_is_bf16_with_tied_embeddings(runs) -> None:
    out, _ = runs[0]
    for name in MODELS:
        config = json.loads((out / name / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
        assert json.loads((out / name / "generation_config.json").read_text())["eos_token_id"] == 0
        tensors = _tensors(out / name)
        assert "lm_head.weight" not in tensors
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_tokenizer_adds_no_bos(runs) -> None:
    out, _ = runs[0]
    text = "import os\n\ndef main():\n    return os.getcwd()\n"
    for name in MODELS:
        ours = Tokenizer.from_pretrained(out / name)
        hf = AutoTokenizer.from_pretrained(out / name)
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids == ours.backend.encode(text, add_special_tokens=False).ids
        assert 0 not in ids and 1 not in ids
        assert (ours.eos_token_id, ours.bos_token_id, hf.pad_token_id) == (0, None, 1)
        assert ours.decode(ids) == text


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_generates_in_engine_like_transformers(runs, name: str) -> None:
    model_dir = runs[0][0] / name
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(str(model_dir), block_size=16, num_kv_blocks=16, max_model_len=64, max_num_seqs=2)
    prompt = llm.get_tokenizer().encode("def main(")
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) == 6
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + tokens])).logits[0]
    for i, token in enumerate(tokens):  # each engine token is transformers' argmax (up to a tie)
        row = logits[len(prompt) - 1 + i]
        assert row[token] >= row.max() - 1e-4


def test_time_budget_plans_the_schedule(tmp_path: Path) -> None:
    report = main(["--out", str(tmp_path), "--tiny", "--target-only", "--steps", "1000000", "--max-epochs", "1e6",
                   "--max-minutes", "0.05", "--eval-every", "100000", "--log-every", "100000"])
    assert report["timings"]["train_s"] < 0.05 * 60 + 2.0
    # The plan came from the measured step time, not from the epoch bound, so the LR decayed.
    assert 0.5 <= report["steps"] / report["planned_steps"] <= 1.0
    assert report["draft_target_greedy_agreement"] is None and list(report["models"]) == [TARGET_NAME]


def test_full_size_checkpoints_fit_the_transfer_limit() -> None:
    limits = {TARGET_NAME: 48e6, DRAFT_NAME: 16e6}
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = build_model(shape, 8192, 0, eos_id=0, pad_id=1)
        params = sum(p.numel() for p in model.parameters())  # the tied embedding counts once
        assert 2 * params < limits[name], (name, params)
        assert model.config.head_dim == 64 and model.config.vocab_size == 8192


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    peak, warmup, total = 1e-3, 10, 100
    lrs = [lr_at(s, peak, warmup, total) for s in range(total + 5)]
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[0] == pytest.approx(peak / warmup)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[total] == pytest.approx(MIN_LR_RATIO * peak) and lrs[-1] == pytest.approx(MIN_LR_RATIO * peak)


def test_batches_are_contiguous_windows_of_the_stream() -> None:
    stream = torch.arange(1000)
    batch = sample_batch(stream, 16, 31, torch.Generator().manual_seed(0))
    assert batch.shape == (16, 32)
    assert torch.equal(batch - batch[:, :1], torch.arange(32).expand(16, 32))
    assert int(batch.min()) >= 0 and int(batch.max()) < 1000


class _Bigram(torch.nn.Module):
    """Logits depend only on the current token, so the exact NLL is a direct sum over the stream."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def test_evaluate_predicts_every_token_once() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, stream = 11, torch.randint(0, 11, (203,), generator=g)  # 202 targets: 3 windows of 64 + 10
    tables = [torch.randn(vocab, vocab, generator=g, dtype=torch.float64) for _ in range(2)]
    result = evaluate([_Bigram(t) for t in tables], stream, seq_len=64, batch_size=2)
    assert result["tokens"] == 202
    for table, nll in zip(tables, result["nll"]):
        expected = -torch.log_softmax(table, -1)[stream[:-1], stream[1:]].mean()
        assert nll == pytest.approx(float(expected), rel=1e-5)
    same = tables[0].argmax(-1)[stream[:-1]] == tables[1].argmax(-1)[stream[:-1]]
    assert result["agreement"] == pytest.approx(float(same.double().mean()))


def test_unigram_baseline_is_add_one_smoothed() -> None:
    train, heldout = np.array([0, 0, 1], dtype=np.uint16), np.array([2, 0, 1], dtype=np.uint16)
    expected = -(math.log(3 / 6) + math.log(2 / 6)) / 2  # counts 2, 1, 0 plus one each, over 3 + 3
    assert unigram_nll(train, heldout, vocab_size=3) == pytest.approx(expected)


def test_corpus_skips_tests_and_holds_out_about_one_file_in_twenty() -> None:
    files = source_files(stdlib_root())
    assert len(files) > 200 and files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    skipped = {"test", "tests", "idlelib", "site-packages"}
    assert not any(skipped & set(f.split("/")[:-1]) for f in files)
    heldout = sum(split_of(f) == "heldout" for f in files) / len(files)
    assert 0.02 < heldout < 0.09


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_distilled_draft_is_closer_to_its_target(runs, tmp_path: Path) -> None:
    """``--distill-from``: a draft trained towards the target's distribution (KL weight 0.9) ends
    closer to it, in KL(target || draft) on held-out text, than one trained on the text alone
    (weight 0) with the same tokenizer, batches and steps."""
    run_dir = runs[0][0]
    target = run_dir / TARGET_NAME
    reports = {alpha: main(["--out", str(tmp_path / str(alpha)), "--tiny", "--seed", "3", "--steps", "40",
                            "--distill-from", str(target), "--distill-alpha", str(alpha)])
               for alpha in (0.0, 0.9)}
    for report in reports.values():
        assert report["distilled_from"] == str(target)
        assert list(report["models"]) == [DRAFT_NAME]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "0.9" / DRAFT_NAME)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(target).get_vocab()
    heldout = (stdlib_root() / (run_dir / "heldout_files.txt").read_text().split()[0]).read_text(errors="replace")
    ids = torch.tensor([tokenizer.encode(heldout)[:256]])

    def log_probs(path: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0], -1)

    teacher = log_probs(target)
    kl = {alpha: torch.nn.functional.kl_div(log_probs(tmp_path / str(alpha) / DRAFT_NAME), teacher,
                                            log_target=True, reduction="batchmean").item()
          for alpha in reports}
    assert kl[0.9] < kl[0.0], kl
