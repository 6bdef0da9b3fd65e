"""Offline throughput and single-stream latency of the engine, with the naive ``transformers``
baseline on the same shapes side by side.

1. Offline throughput: ``--num-requests`` requests (default 256), prompt and output lengths each
   uniform in [``--min-len``, ``--max-len``] (seeded), random prompt token ids, ignore_eos,
   temperature 0.6; output tokens / wall time after one warm-up call.
2. Single stream: one 128-token prompt, 256 new tokens, after warm-up: tokens/s and time per
   output token; with ``--async-scheduling`` also how long the host waited for the device a token
   (``host_wait_ms_per_token``: about none when the host, not the device, sets the pace).

The warm-up call is the measured call itself, run once before: kernels compile per shape on
first use (Triton's and FlashAttention-4's JIT take seconds each), and a warm-up of other
shapes leaves compiles inside the timed call. The prefix cache is reset after the warm-up, so
the measured call computes every prompt token.
3. Baseline: Hugging Face ``generate`` (random weights of the same shape), batch 1 and 64.

    python -m bench.bench_offline --shape qwen3-0.6b --dtype bfloat16 --out bench/results/offline_qwen3-0.6b.json
    python -m bench.bench_offline --shape cpu-small --num-requests 16 --max-len 128 --single-new-tokens 64
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.common import recorded_host_waits, write_result, write_shape_dir
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def _run_all(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
             first_token: list[float] | None = None) -> tuple[float, int]:
    """Wall time and output tokens of running every request to the end; ``first_token`` gets the
    time from the start to the first output token."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{time.monotonic_ns()}-{i}", prompt, p)
    start, tokens, steps = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        tokens += sum(len(c.token_ids) for out in engine.step() for c in out.outputs)
        if first_token is not None and tokens and not first_token:
            first_token.append(time.perf_counter() - start)
        steps += 1
        if steps % 200 == 0:
            print(f"  step {steps}: {tokens} tokens out", flush=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def offline_throughput(engine: LLMEngine, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    lengths = [(rng.randint(args.min_len, args.max_len), rng.randint(args.min_len, args.max_len))
               for _ in range(args.num_requests)]
    prompts = [[rng.randrange(2, vocab) for _ in range(p)] for p, _ in lengths]
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, detokenize=False)
              for _, o in lengths]
    _run_all(engine, prompts, params)
    engine.reset_prefix_cache()
    wall, tokens = _run_all(engine, prompts, params)
    return {"requests": args.num_requests, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall,
            "total_tokens_per_s": (tokens + sum(p for p, _ in lengths)) / wall}


def single_stream(engine: LLMEngine, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed + 1)
    prompt = [rng.randrange(2, engine.model_config.vocab_size) for _ in range(args.single_prompt_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=args.single_new_tokens, ignore_eos=True, detokenize=False)
    _run_all(engine, [prompt], [params])
    runs = []
    with recorded_host_waits() as waits:
        for _ in range(args.single_repeats):
            engine.reset_prefix_cache()
            waits.clear()
            first: list[float] = []
            wall, tokens = _run_all(engine, [prompt], [params], first)
            ttft = first[0]
            runs.append({"prompt_tokens": len(prompt), "output_tokens": tokens, "wall_s": wall,
                         "tokens_per_s": tokens / wall, "time_per_output_token_ms": 1000 * wall / tokens,
                         "ttft_ms": 1000 * ttft, "decode_ms_per_token": 1000 * (wall - ttft) / max(tokens - 1, 1)})
            if waits:  # asynchronous scheduling: the host's wait for each token after the first
                runs[-1]["host_wait_ms_per_token"] = 1000 * sum(wait for _, wait, _ in waits[1:]) / max(tokens - 1, 1)
    # The median run by wall time; every run's figures with it when there are several.
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return median if len(runs) == 1 else median | {"runs": runs}


def hf_baseline(model_dir: Path, dtype: torch.dtype, batch: int, args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):  # random init on the device: an 8B model on a slow CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(2, config.vocab_size, (batch, args.single_prompt_tokens), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.single_new_tokens, min_new_tokens=args.single_new_tokens,
                             **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * batch
    del model
    return {"batch": batch, "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--single-prompt-tokens", type=int, default=128)
    parser.add_argument("--single-new-tokens", type=int, default=256)
    parser.add_argument("--single-repeats", type=int, default=1, help="single-stream runs (the median is reported)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-cuda-graph-prefill-tokens", type=int, default=EngineArgs.max_cuda_graph_prefill_tokens,
                        help="0: prompt steps of one request run eagerly")
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--awq", action="store_true", help="the shape quantized to AWQ 4-bit (dummy weights)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--baseline-batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the engine's start-up
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape_dir(args.shape, Path(tmp), awq=args.awq)
        engine = LLMEngine(EngineArgs(
            model=str(model_dir), load_format="dummy", dtype=args.dtype, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
            max_model_len=2 * args.max_len + 16, attention_backend=args.attention_backend,
            enforce_eager=args.enforce_eager, max_cuda_graph_prefill_tokens=args.max_cuda_graph_prefill_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
            async_scheduling=args.async_scheduling,
        ))
        offline = None
        if not args.skip_offline:
            print("offline throughput ...", flush=True)
            offline = offline_throughput(engine, args)
        print("single stream ...", flush=True)
        single = single_stream(engine, args)
        dtype = engine.model_config.dtype
        backend = engine.cache_info()["attention_backend"]
        del engine
        baseline = []
        for batch in args.baseline_batches:
            print(f"transformers baseline, batch {batch} ...", flush=True)
            baseline.append(hf_baseline(model_dir, dtype, batch, args))
    if offline is not None:
        print(f"offline: {offline['output_tokens_per_s']:.1f} output tok/s ({offline['output_tokens']} tokens, "
              f"{offline['wall_s']:.1f} s)")
    waited = (f", of which the host waited {single['host_wait_ms_per_token']:.3f} for the device"
              if "host_wait_ms_per_token" in single else "")
    print(f"single stream: {single['tokens_per_s']:.1f} tok/s ({single['time_per_output_token_ms']:.2f} ms/token; "
          f"first token {single['ttft_ms']:.1f} ms, then {single['decode_ms_per_token']:.3f} ms/token{waited})")
    for b in baseline:
        print(f"transformers generate, batch {b['batch']}: {b['output_tokens_per_s']:.1f} tok/s")
    if args.out:
        write_result(args.out, {"benchmark": "offline", "settings": vars(args) | {"out": str(args.out)},
                                "attention_backend": backend, "dtype": str(dtype),
                                "offline_throughput": offline, "single_stream": single,
                                "transformers_baseline": baseline})


if __name__ == "__main__":
    main()
