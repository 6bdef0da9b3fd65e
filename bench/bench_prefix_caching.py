"""Prefix-caching benchmark: many requests sharing a long system prompt, caching on vs off.

After one warming request, ``--num-requests`` requests arrive at once, each the shared system
prompt plus its own question; every one generates ``--output-tokens`` tokens (ignore_eos).
Reports the prefix-hit rate over the shared tokens, TTFT p50/p99 and throughput for both modes.

    python -m bench.bench_prefix_caching --shape cpu-small --out bench/results/prefix_caching_cpu.json
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bench.common import percentile, write_result, write_shape_dir
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def run_mode(args: argparse.Namespace, model_dir: Path, caching: bool) -> dict:
    engine = LLMEngine(EngineArgs(
        model=str(model_dir), load_format="dummy", dtype=args.dtype, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, enable_prefix_caching=caching,
        max_model_len=args.system_tokens + args.question_tokens + args.output_tokens + 16,
        attention_backend=args.attention_backend,
    ))
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    system = [rng.randrange(2, vocab) for _ in range(args.system_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True, detokenize=False)

    def question() -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(args.question_tokens)]

    engine.add_request("warm", system + question(), params)
    while engine.has_unfinished_requests():
        engine.step()
    hits_before = engine.scheduler.stats().prefix_cache_hits
    start = time.perf_counter()
    for i in range(args.num_requests):
        engine.add_request(f"r{i}", system + question(), params)
    ttft, cached, outputs, steps = {}, {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids and out.request_id not in ttft:
                ttft[out.request_id] = out.metrics.first_token_time - out.metrics.arrival_time
            outputs += sum(len(o.token_ids) for o in out.outputs)
            cached[out.request_id] = out.num_cached_tokens
        steps += 1
        if steps % 50 == 0:
            print(f"  [{'on' if caching else 'off'}] step {steps}: {len(ttft)}/{args.num_requests} started, "
                  f"{outputs} tokens out", flush=True)
    wall = time.perf_counter() - start
    shared = args.num_requests * args.system_tokens
    prompt_tokens = args.num_requests * (args.system_tokens + args.question_tokens)
    ttfts = list(ttft.values())
    return {
        "prefix_caching": caching,
        "prefix_hit_rate_of_shared_tokens": sum(cached.values()) / shared,
        "cached_tokens_from_scheduler": engine.scheduler.stats().prefix_cache_hits - hits_before,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "wall_s": wall,
        "output_tokens": outputs,
        "output_tokens_per_s": outputs / wall,
        "total_tokens_per_s": (outputs + prompt_tokens) / wall,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--question-tokens", type=int, default=50)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape_dir(args.shape, Path(tmp))
        results = {}
        for caching in (False, True):
            print(f"prefix caching {'on' if caching else 'off'} ...", flush=True)
            results["on" if caching else "off"] = run_mode(args, model_dir, caching)
    on, off = results["on"], results["off"]
    summary = {
        "hit_rate": on["prefix_hit_rate_of_shared_tokens"],
        "ttft_p50_speedup": off["ttft_p50_s"] / on["ttft_p50_s"],
        "throughput_speedup": on["total_tokens_per_s"] / off["total_tokens_per_s"],
        "goals": {"hit_rate >= 0.95": None, "ttft_p50_speedup >= 5": None, "throughput_speedup >= 2": None},
    }
    summary["goals"] = {
        "hit_rate >= 0.95": summary["hit_rate"] >= 0.95,
        "ttft_p50_speedup >= 5": summary["ttft_p50_speedup"] >= 5,
        "throughput_speedup >= 2": summary["throughput_speedup"] >= 2,
    }
    print(f"{'mode':<5} {'hit rate':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'out tok/s':>10} {'total tok/s':>12}")
    for name, r in results.items():
        print(f"{name:<5} {r['prefix_hit_rate_of_shared_tokens']:>9.3f} {r['ttft_p50_s']:>10.3f} "
              f"{r['ttft_p99_s']:>10.3f} {r['output_tokens_per_s']:>10.1f} {r['total_tokens_per_s']:>12.1f}")
    print(f"TTFT p50 {summary['ttft_p50_speedup']:.1f}x lower, throughput {summary['throughput_speedup']:.1f}x higher")
    if args.out:
        write_result(args.out, {"benchmark": "prefix_caching", "settings": vars(args) | {"out": str(args.out)},
                                "results": results, "summary": summary})


if __name__ == "__main__":
    main()
