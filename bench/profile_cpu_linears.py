"""Decode and verify step times on the CPU for each kernel of the packed fp16 linears.

One process builds, for each kernel (sluice's own, engine/layers/cpu_gemm.cpp, and fbgemm's
fp16 GEMM), a baseline engine and an n-gram engine over the bundled model with
``--cpu-onednn-linear``; every recorded input-grounded prompt then runs alone in all four in
turn, so that the machine's drift hits them alike. Per engine: the median wall time of a plain
decode step and of a verify step (1 + k tokens), and decode tokens/s; per kernel the n-gram
speedup. Prompts are the ``regenerate`` recording of bench/replay_spec_policy.py.

    python -m bench.profile_cpu_linears --out bench/results/profile_cpu_linears_s11.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.bench_spec_decode import REPO, _params, batch1_cpu_settings, engine_for
from bench.common import write_result
from engine.layers import cpu_native

RECORDED = REPO / "bench" / "results" / "spec_decode_cpu_ngram_policy_replay.recorded.json"
MODES = ("baseline", "ngram-min1-max16")  # the mode names set the lookup lengths


def build(kernel: str, mode: str, args: argparse.Namespace):
    settings = batch1_cpu_settings(args.model)
    available = cpu_native.available
    if kernel == "fbgemm":
        cpu_native.available = lambda: False  # packing then falls back to fbgemm
    try:
        engine = engine_for(settings, args.model, mode)
    finally:
        cpu_native.available = available
    packed = engine.runner.model.model.layers[0].mlp.gate_up_proj.packed_weight
    assert (kernel == "sluice") == (isinstance(packed, torch.Tensor) and packed.dtype == torch.float16), kernel
    return engine


def run(engine, prompt: list[int], max_tokens: int, times: dict) -> None:
    engine.add_request(f"r{time.monotonic_ns()}", prompt, _params(max_tokens))
    engine.step()  # the prompt
    while engine.has_unfinished_requests():
        kind = "verify" if any(r.spec_token_ids for r in engine.scheduler.running) else "plain"
        start = time.perf_counter()
        engine.step()
        times[kind].append(time.perf_counter() - start)
    times["tokens"] += max_tokens - 1
    engine.reset_prefix_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sluice-pycoder"))
    parser.add_argument("--recorded", type=Path, default=RECORDED)
    parser.add_argument("--num-prompts", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_native.available():
        raise SystemExit("sluice's CPU kernel cannot be built here (engine/layers/cpu_native.py)")
    items = json.loads(args.recorded.read_text())["regenerate"][:args.num_prompts]
    engines = {(kernel, mode): build(kernel, mode, args) for kernel in ("sluice", "fbgemm") for mode in MODES}
    for engine in engines.values():  # warm-up
        run(engine, items[0][0], 8, {"plain": [], "verify": [], "tokens": 0})
    times = {key: {"plain": [], "verify": [], "tokens": 0} for key in engines}
    for i, (prompt, output) in enumerate(items):
        for key, engine in engines.items():
            run(engine, prompt, len(output), times[key])
        print(f"  prompt {i + 1}/{len(items)}", flush=True)

    def median_ms(values: list[float]) -> float | None:
        return 1000 * sorted(values)[len(values) // 2] if values else None

    rows = {}
    for (kernel, mode), t in times.items():
        seconds = sum(t["plain"]) + sum(t["verify"])
        rows[f"{kernel}/{mode}"] = {
            "plain_steps": len(t["plain"]), "plain_step_median_ms": median_ms(t["plain"]),
            "verify_steps": len(t["verify"]), "verify_step_median_ms": median_ms(t["verify"]),
            "decode_tokens_per_s": t["tokens"] / seconds,
        }
        print(f"{kernel:7s} {mode:17s} plain {len(t['plain']):5d} steps, median {median_ms(t['plain']):.2f} ms; "
              f"verify {len(t['verify']):4d}, median {median_ms(t['verify']) or float('nan'):.2f} ms; "
              f"{t['tokens'] / seconds:.1f} tok/s", flush=True)
    for kernel in ("sluice", "fbgemm"):
        ngram, baseline = (rows[f"{kernel}/{mode}"]["decode_tokens_per_s"] for mode in reversed(MODES))
        speedup = ngram / baseline
        rows[f"{kernel}/speedup"] = speedup
        print(f"{kernel}: n-gram speedup {speedup:.3f}x")
    if args.out:
        write_result(args.out, {"benchmark": "profile_cpu_linears", "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
