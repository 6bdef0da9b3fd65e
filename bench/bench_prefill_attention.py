"""The Triton paged prefill attention kernel alone, on the H200: one chunk of whole prompts as the
offline workload's first steps schedule them (prompt lengths uniform in [100, 1024], seeded, until
``--tokens`` tokens; Llama-3.1-8B heads: 32 query, 8 kv, head_dim 128; block size 16, bf16), time
per call from CUDA-graph replays and the causal attention's rate in TFLOPS, for the default
tiling and, with ``--sweep``, a grid of others (needs a CUDA GPU).

    python -m bench.bench_prefill_attention [--sweep] [--tokens 8192] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

from bench.common import write_result
from engine.kernels.prefill_attention import prefill_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def make_chunk(tokens: int, seed: int = 0) -> dict:
    """Whole prompts of lengths uniform in [100, 1024] filling ``tokens`` (the last one cut to fit),
    their keys and values already in the cache (each prompt's blocks consecutive)."""
    rng = random.Random(seed)
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(rng.randint(100, 1024))
    lens[-1] -= sum(lens) - tokens
    blocks_per_req = triton.cdiv(max(lens), BLOCK_SIZE)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k_cache = torch.randn(len(lens) * blocks_per_req, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda",
                          dtype=torch.bfloat16, generator=gen)
    return dict(
        query=torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen),
        key_cache=k_cache, value_cache=torch.randn_like(k_cache),
        block_tables=torch.arange(k_cache.shape[0], device="cuda", dtype=torch.int32).view(len(lens), -1),
        seq_lens=torch.tensor(lens, device="cuda", dtype=torch.int32),
        query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], device="cuda", dtype=torch.int32),
        max_query_len=max(lens),
        # QK^T and PV over the causal triangle: 4 * head_dim flops a (query, key) pair and head.
        flops=sum(n * (n + 1) // 2 for n in lens) * HEADS * HEAD_DIM * 4,
        prompts=len(lens),
    )


def time_us(chunk: dict, **kwargs) -> float:
    out = torch.empty_like(chunk["query"])

    def call():
        prefill_attention(chunk["query"], chunk["key_cache"], chunk["value_cache"], chunk["block_tables"],
                          chunk["seq_lens"], chunk["query_start_loc"], 0.088, None, out,
                          max_query_len=chunk["max_query_len"], **kwargs)

    call()
    return 1000 * do_bench_cudagraph(call, rep=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the chunk (max_num_batched_tokens)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tilings")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chunk = make_chunk(args.tokens)
    rows = [{"config": "default", "us": time_us(chunk)}]
    if args.sweep:
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
            try:
                us = time_us(chunk, block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            except Exception as exc:  # a tiling that does not fit (shared memory, registers): skip it
                print(f"  block_m {bm} block_n {bn} warps {w} stages {st}: {type(exc).__name__}", flush=True)
                continue
            rows.append({"config": dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st), "us": us})
    for row in rows:
        row["tflops"] = chunk["flops"] / row["us"] / 1e6
    print(f"{chunk['prompts']} prompts, {args.tokens} tokens")
    for row in sorted(rows, key=lambda r: r["us"]):
        print(f"{row['us']:8.1f} us {row['tflops']:5.0f} TFLOPS  {row['config']}")
    if args.out:
        write_result(args.out, {"benchmark": "prefill_attention", "settings": vars(args) | {"out": str(args.out)},
                                "prompts": chunk["prompts"], "flops": chunk["flops"], "rows": rows})


if __name__ == "__main__":
    main()
