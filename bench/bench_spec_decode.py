"""Speculative decoding: acceptance and speed with and without drafts, batch 1 and a batch sweep.

Workloads (greedy, ignore_eos), from the held-out split of the bundled models' corpus
(``models/corpus.py``), which the models never trained on:

- ``heldout``: the first ``--prompt-tokens`` tokens of a held-out file; ``--max-tokens`` new ones.
- ``repeat``: a top-level function of a held-out file, then ``# the same function again:`` and
  its first line; as many new tokens as the rest of the function has.
- ``regenerate`` (input-grounded: the prompt holds the answer): a held-out prompt P, the target's
  own greedy continuation C of it, then P again; ``len(C)`` new tokens. What resending a file
  to be rewritten looks like, for a model too small to copy code it did not write (``repeat``).

Modes: ``baseline`` (no speculation), ``draft`` (the draft model), ``ngram`` (prompt lookup) and
``oracle``: drafts the target's own greedy continuation recorded by the baseline run, so every
draft the target would accept is proposed at no cost: it measures how cheap a verify step is.
With ``--load-format dummy`` (random weights in a real shape) the weights are made *peaked*
(``peak_dummy_weights``): random weights give near-flat logits whose argmax flips with rounding,
so a 5-token verify and a 1-token decode disagree and the oracle falls off its path. Peaked, the
model counts (after token t comes t + 1; t again when the embeddings are tied) by a wide margin.
The kernels and their cost are the same; only the values change.

A mode may carry options: ``-kN`` its k, ``-minN`` / ``-maxN`` its ngram_prompt_lookup_min / _max
(``ngram-min3``, ``ngram-max8``), ``-cN`` its draft_confidence_threshold N / 10 (``draft-c5``).
One engine per mode, all built first; each request runs alone (batch 1) in every mode in turn,
so that a change in machine load hits all modes alike. Figures: time to first token, then decode
tokens/s from the first token to the last. The sweep runs ``B`` ``regenerate`` requests at once
per batch size and reports decode tokens/s once every request has its first token (on a GPU
after one untimed run of the same batch, whose steps may compile kernels): where speculation
stops paying sets ``speculative_disable_batch_size``.

    python -m bench.bench_spec_decode --modes baseline,draft,ngram,ngram-min3,oracle --batch-sizes 1,2,4,8,16,32 \\
        --out bench/results/spec_decode_cpu.json
    python -m bench.bench_spec_decode --shape llama-3.1-8b --load-format dummy --modes baseline,oracle,ngram \\
        --workloads heldout,regenerate --num-prompts 4 --batch-sizes 1,2,4,8,16,32,64 \\
        --out bench/results/spec_decode_h200.json
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from bench.common import write_result, write_shape_dir
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.spec_decode.proposer import DraftRequest, Proposal, Proposer
from models.corpus import source_files, split_of, stdlib_root

REPO = Path(__file__).resolve().parent.parent
REPEAT_INTRO, REPEAT_AGAIN = "# here is a function:\n", "\n# the same function again:\n"
Item = tuple[list[int], int]  # (prompt token ids, new tokens)


class OracleProposer(Proposer):
    """Proposes the target's recorded greedy continuation of each prompt (no model, no cost)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations

    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        drafts = []
        for r in requests:
            recorded = self.continuations.get(tuple(r.prompt_token_ids), [])
            n = len(r.output_token_ids)
            # Off the recorded path (a near-tie broke the other way): nothing left to replay.
            on_path = recorded[:n] == list(r.output_token_ids)
            drafts.append(recorded[n:n + r.num_draft_tokens] if on_path else [])
        return Proposal(drafts)

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        """Nothing is kept per request."""


@torch.no_grad()
def peak_dummy_weights(model: torch.nn.Module, scale: float = 5000.0) -> None:
    """Make random weights predict ``t + 1`` after ``t`` by a wide margin: the embeddings
    (std 0.02) are scaled up to dominate the residual stream over the layers' random outputs,
    and the output row of token ``v`` is the (unscaled) embedding of ``v - 1``, so the final
    hidden state of token ``t`` scores ``t + 1`` highest (``t`` itself with tied embeddings)."""
    embed = model.model.embed_tokens.weight
    lm_head = model.lm_head.weight
    if lm_head.data_ptr() != embed.data_ptr():
        lm_head.copy_(torch.roll(embed, 1, 0))
    embed.mul_(scale)


# ---------------------------------------------------------------------------- workloads
def heldout_texts() -> list[str]:
    root = stdlib_root()
    return [(root / rel).read_text(encoding="utf-8", errors="replace")
            for rel in source_files(root) if split_of(rel) == "heldout"]


def heldout_prompts(engine: LLMEngine, num: int, prompt_tokens: int) -> list[list[int]]:
    prompts = []
    for text in heldout_texts():
        ids = engine.tokenizer.encode(text)
        if len(ids) > prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == num:
            break
    return prompts


def repeat_items(engine: LLMEngine, num: int, min_tokens: int, max_tokens: int) -> list[Item]:
    """Functions of the held-out files to repeat (top level: their text starts at column 0)."""
    found = []
    for text in heldout_texts():
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.col_offset:
                continue
            source = ast.get_source_segment(text, node)
            first, _, rest = (source or "").partition("\n")
            if not rest or not min_tokens <= len(engine.tokenizer.encode(source)) <= max_tokens:
                continue
            found.append((engine.tokenizer.encode(REPEAT_INTRO + source + REPEAT_AGAIN + first + "\n"),
                          len(engine.tokenizer.encode(rest))))
            if len(found) == num:
                return found
    return found


def regenerate_items(baseline: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[Item]:
    """P + C + P for each held-out prompt P, C the target's greedy continuation of P."""
    separator = baseline.tokenizer.encode("\n\n")
    return [(p + c + separator + p, len(c))
            for p in prompts for c in [run_single(baseline, p, max_tokens)["tokens"]]]


# ---------------------------------------------------------------------------- measurement
def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def run_single(engine: LLMEngine, prompt: list[int], max_tokens: int) -> dict:
    """One request alone: its tokens, TTFT and decode time after the first token."""
    engine.add_request(f"r{time.monotonic_ns()}", prompt, _params(max_tokens))
    tokens: list[int] = []
    start = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                tokens.extend(c.token_ids)
        if first is None and tokens:
            first = time.perf_counter()
    _sync()
    end = time.perf_counter()
    assert first is not None
    engine.reset_prefix_cache()  # every run computes its prompt
    return {"tokens": tokens, "ttft_s": first - start, "decode_s": end - first}


def run_batch(engine: LLMEngine, items: list[Item]) -> tuple[int, float]:
    """Requests at once: (tokens, seconds) from the step where each has its first token."""
    for i, (prompt, n) in enumerate(items):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", prompt, _params(n))
    started: set[str] = set()
    num_tokens, start = 0, None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if start is not None:
            num_tokens += sum(len(c.token_ids) for out in outputs for c in out.outputs)
        started |= {out.request_id for out in outputs}
        if start is None and len(started) == len(items):
            _sync()
            start = time.perf_counter()
    _sync()
    engine.reset_prefix_cache()
    assert start is not None
    return num_tokens, time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Counter:
    """Speculative-decoding counts of an engine between two points."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.before = self._now()

    def _now(self) -> tuple[int, int, int]:
        s = self.engine.scheduler.spec_decode_stats
        return s.num_verify_steps, s.num_draft_tokens, s.num_accepted_tokens

    def figures(self) -> dict:
        steps, drafts, accepted = (a - b for a, b in zip(self._now(), self.before, strict=True))
        return {"verify_steps": steps, "draft_tokens": drafts, "accepted_draft_tokens": accepted,
                "acceptance_rate": accepted / drafts if drafts else 0.0,
                "mean_accepted_length": 1 + accepted / steps if steps else 0.0}


# ---------------------------------------------------------------------------- modes
def batch1_cpu_settings(model: str) -> argparse.Namespace:
    """This benchmark's settings for the bundled model at batch 1 on the CPU (k = 4, packed
    linears), for tools that build its engines themselves; a mode's options set the lookup."""
    return argparse.Namespace(model=model, draft=None, shape=None, load_format="auto", dtype="auto", k=4,
                              ngram_min=1, ngram_max=4, max_model_len=2048, num_kv_blocks=2048, batch_sizes=[1],
                              cpu_onednn_linear=True)


def engine_for(args: argparse.Namespace, model: str, mode: str) -> LLMEngine:
    """The engine of ``mode``: a proposer name, optionally with ``-kN`` (its k) and, for
    ``ngram``, ``-minN`` / ``-maxN`` (its ngram_prompt_lookup_min / _max), e.g. ``ngram-min3``,
    ``ngram-max8`` or ``draft-k2``; for ``draft``, ``-cN`` (draft_confidence_threshold N / 10)."""
    proposer, *options = mode.split("-")
    k, ngram_min, ngram_max, confidence = args.k, args.ngram_min, args.ngram_max, None
    for option in options:
        if option.startswith("min"):
            ngram_min = int(option[3:])
        elif option.startswith("max"):
            ngram_max = int(option[3:])
        elif option.startswith("k"):
            k = int(option[1:])
        elif option.startswith("c"):
            confidence = int(option[1:]) / 10
        else:
            raise ValueError(f"unknown mode option {option!r} in {mode!r}")
    spec: dict[str, object] = {}
    if proposer == "draft":
        spec = {"speculative_model": args.draft}
    elif proposer in ("ngram", "oracle"):
        # The oracle's proposer replaces the n-gram one.
        spec = {"speculative_method": "ngram", "ngram_prompt_lookup_min": ngram_min,
                "ngram_prompt_lookup_max": max(ngram_min, ngram_max)}
    elif proposer != "baseline":
        raise ValueError(f"unknown mode {mode!r}")
    if spec:
        spec.update(num_speculative_tokens=k, speculative_disable_batch_size=None)
    if confidence is not None:
        spec.update(draft_confidence_threshold=confidence)
    engine = LLMEngine(EngineArgs(
        model=model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=max(args.batch_sizes), num_kv_blocks=args.num_kv_blocks,
        cpu_onednn_linear=args.cpu_onednn_linear, **spec,
    ))
    if args.load_format == "dummy":
        peak_dummy_weights(engine.runner.model)
    return engine


def batch1(engines: dict[str, LLMEngine], items: list[Item], continuations: dict) -> dict:
    """Each item alone in every mode in turn (after one warm-up request per mode)."""
    for engine in engines.values():
        run_single(engine, items[0][0], min(items[0][1], 8))
    runs: dict[str, list[dict]] = {mode: [] for mode in engines}
    counters = {mode: Counter(engine) for mode, engine in engines.items()}
    for prompt, n in items:
        for mode, engine in engines.items():
            runs[mode].append(run_single(engine, prompt, n))
            if mode == "baseline":  # what the oracle replays
                continuations[tuple(prompt)] = runs[mode][-1]["tokens"]
    figures = {}
    for mode, mode_runs in runs.items():
        decode_tokens = sum(len(r["tokens"]) - 1 for r in mode_runs)
        figures[mode] = {
            "requests": len(mode_runs),
            "output_tokens": sum(len(r["tokens"]) for r in mode_runs),
            "decode_tokens_per_s": decode_tokens / sum(r["decode_s"] for r in mode_runs),
            "mean_ttft_s": sum(r["ttft_s"] for r in mode_runs) / len(mode_runs),
            **counters[mode].figures(),
            "same_tokens_as_baseline": [r["tokens"] for r in mode_runs] == [r["tokens"] for r in runs["baseline"]],
        }
    for f in figures.values():
        f["decode_speedup"] = f["decode_tokens_per_s"] / figures["baseline"]["decode_tokens_per_s"]
    return figures


def sweep(engines: dict[str, LLMEngine], items: list[Item], batch_sizes: list[int]) -> dict:
    """Decode tokens/s with ``B`` requests at once, every mode in turn per batch size."""
    figures: dict[str, dict] = {mode: {} for mode in engines}
    for batch_size in batch_sizes:
        batch = [items[i % len(items)] for i in range(batch_size)]
        for mode, engine in engines.items():
            if torch.cuda.is_available():  # a batch size's first steps may compile kernels
                run_batch(engine, batch)
            counter = Counter(engine)
            num_tokens, seconds = run_batch(engine, batch)
            figures[mode][str(batch_size)] = {"decode_tokens_per_s": num_tokens / seconds, **counter.figures()}
        base = figures["baseline"][str(batch_size)]["decode_tokens_per_s"]
        for mode in engines:
            f = figures[mode][str(batch_size)]
            f["speedup"] = f["decode_tokens_per_s"] / base
        print(f"  sweep batch {batch_size}: " + ", ".join(
            f"{m} {figures[m][str(batch_size)]['speedup']:.2f}x" for m in engines), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sluice-pycoder"))
    parser.add_argument("--draft", default=str(REPO / "models" / "sluice-pycoder-draft"))
    parser.add_argument("--shape", help="a bench/common.py shape instead of --model (with --load-format dummy)")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", help="baseline first, then any of draft, ngram, oracle (see engine_for for "
                        "variants); default: baseline,draft,ngram,oracle (with --shape: no draft)")
    parser.add_argument("--oracle", action="store_true", help="only baseline and oracle: how cheap verify is")
    parser.add_argument("--workloads", default="heldout,repeat,regenerate")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--ngram-min", type=int, default=1, help="ngram_prompt_lookup_min")
    parser.add_argument("--ngram-max", type=int, default=4, help="ngram_prompt_lookup_max")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat-min-tokens", type=int, default=48)
    parser.add_argument("--repeat-max-tokens", type=int, default=160)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-onednn-linear", action=argparse.BooleanOptionalAction,
                        default=EngineArgs.cpu_onednn_linear, help="on CPU, packed linears (the engine's default)")
    parser.add_argument("--note", default="", help="free text stored with the results (the machine's state)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "spec_decode_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.oracle:
        args.modes = "baseline,oracle"
    modes = (args.modes or ("baseline,ngram,oracle" if args.shape else "baseline,draft,ngram,oracle")).split(",")
    assert modes[0] == "baseline", "the baseline runs first: the others are compared with it"
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_shape_dir(args.shape, Path(tmp) / args.shape)) if args.shape else args.model
        result = run(args, model, modes, args.workloads.split(","))
    write_result(args.out, {"note": args.note, **result} if args.note else result)


def run(args: argparse.Namespace, model: str, modes: list[str], workload_names: list[str]) -> dict:
    engines = {mode: engine_for(args, model, mode) for mode in modes}
    continuations: dict[tuple[int, ...], list[int]] = {}
    for mode, engine in engines.items():
        if mode.startswith("oracle"):
            engine.proposer = OracleProposer(continuations)
    baseline = engines["baseline"]
    prompts = heldout_prompts(baseline, args.num_prompts, args.prompt_tokens)
    builders = {
        "heldout": lambda: [(p, args.max_tokens) for p in prompts],
        "repeat": lambda: repeat_items(baseline, args.num_prompts, args.repeat_min_tokens, args.repeat_max_tokens),
        "regenerate": lambda: regenerate_items(baseline, prompts, args.max_tokens),
    }
    workloads = {name: builders[name]() for name in workload_names}
    result: dict = {
        "model": args.shape or Path(model).name,
        "draft": Path(args.draft).name if any(m.startswith("draft") for m in modes) else None,
        "k": args.k, "ngram_prompt_lookup": [args.ngram_min, args.ngram_max], "greedy": True,
        "threads": torch.get_num_threads(),
        "workload_requests": {name: len(items) for name, items in workloads.items()},
        "batch1": {}, "sweep": {},
    }
    for name, items in workloads.items():
        print(f"== batch 1, {name}", flush=True)
        result["batch1"][name] = batch1(engines, items, continuations)
        for mode, f in result["batch1"][name].items():
            print(f"  {mode}: {f['decode_tokens_per_s']:.1f} decode tokens/s ({f['decode_speedup']:.2f}x), "
                  f"acceptance {f['acceptance_rate']:.2f}, mean accepted length {f['mean_accepted_length']:.2f}",
                  flush=True)
    sweep_items = workloads.get("regenerate") or next(iter(workloads.values()))
    print("== sweep", flush=True)
    result["sweep"] = sweep(engines, sweep_items, args.batch_sizes)
    return result


if __name__ == "__main__":
    main()
