"""The Triton split-KV decode attention kernel alone, on the H200: time per call and KV bytes
streamed per second, for the engine's default tiling and a grid of others (needs a CUDA GPU).

    python -m bench.bench_decode_attention [--sweep] [--out FILE]

Cases are the offline and single-stream workloads of the GPU-speed issue: Qwen3-0.6B heads (16
query, 8 kv, head_dim 128) and Llama-3.1-8B heads (32 query, 8 kv), block size 16, bf16, the
requests' blocks scattered over the cache as the allocator leaves them. Each call is replayed
from a CUDA graph (as decode steps run), so launch overhead is that of a graph node.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

from bench.common import write_result
from engine.kernels.decode_attention import SHORT_SEQ_LEN, decode_attention, decode_num_splits, num_sms

# name -> (query heads, kv heads, requests, context length)
CASES = {
    "qwen3-0.6b b256 ctx1024": (16, 8, 256, 1024),
    "qwen3-0.6b b1 ctx256": (16, 8, 1, 256),
    "llama-3.1-8b b128 ctx1024": (32, 8, 128, 1024),
    "llama-3.1-8b b1 ctx256": (32, 8, 1, 256),
    "llama-3.1-8b b1 ctx1024": (32, 8, 1, 1024),
    "llama-3.1-8b b1 ctx4096": (32, 8, 1, 4096),
    # The offline workload's decode steps: contexts uniform in [100, 1124] (prompt + output so far).
    "llama-3.1-8b b256 ctx100-1124": (32, 8, 256, (100, 1124)),
    # Its later steps: fewer, longer requests (grids of 256 and 512 programs at one split).
    "llama-3.1-8b b32 ctx1536": (32, 8, 32, 1536),
    "llama-3.1-8b b64 ctx2048": (32, 8, 64, 2048),
    "qwen3-0.6b b256 ctx100-1124": (16, 8, 256, (100, 1124)),
}
HEAD_DIM, BLOCK_SIZE = 128, 16


def make_case(heads: int, kv_heads: int, reqs: int, ctx: int | tuple[int, int]) -> dict:
    """Requests of ``ctx`` tokens each, or of lengths uniform in the range ``ctx`` (seeded)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    if isinstance(ctx, tuple):
        lens = torch.randint(ctx[0], ctx[1] + 1, (reqs,), generator=torch.Generator().manual_seed(0))
        ctx = ctx[1]
    else:
        lens = torch.full((reqs,), ctx)
    blocks_per_req = triton.cdiv(ctx, BLOCK_SIZE)
    num_blocks = reqs * blocks_per_req + 16
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                          generator=gen)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)[: reqs * blocks_per_req]
    return dict(
        query=torch.randn(reqs, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen),
        key_cache=k_cache, value_cache=v_cache,
        block_tables=perm.view(reqs, blocks_per_req).to(torch.int32),
        seq_lens=lens.to(device="cuda", dtype=torch.int32),
        order=torch.argsort(lens, descending=True, stable=True).to(device="cuda", dtype=torch.int32),
        max_seq_len=ctx,
        kv_bytes=int(lens.sum()) * kv_heads * HEAD_DIM * 2 * 2,
    )


def time_us(case: dict, **kwargs) -> float:
    out = torch.empty_like(case["query"])
    args = (case["query"], case["key_cache"], case["value_cache"], case["block_tables"], case["seq_lens"], 0.088)

    def call():
        decode_attention(*args, None, out, **kwargs)

    call()
    return 1000 * do_bench_cudagraph(call, rep=30)


def sweep_grid(reqs: int, kv_heads: int) -> list[dict]:
    """Tilings to try (each split count, tile shape and early-tile choice is a compile: keep it
    small). 4 warps and 2 stages only: 8 warps or 3-4 stages were slower on every case of
    bench/results/decode_attention_tiling_s35.json."""
    if reqs * kv_heads < 1024:
        default = decode_num_splits(reqs, kv_heads, None, sms=num_sms(torch.device("cuda")))
        splits = sorted({1, 2, 4, 8, 16, default})
    else:
        splits = [1, 2]
    return [dict(num_splits=s, block_n=bn, early_tile=e, num_warps=4, num_stages=2)
            for s, bn, e in itertools.product(splits, (32, 64, 128), (True, False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tilings per case")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        heads, kv_heads, reqs, ctx = CASES[name]
        case = make_case(heads, kv_heads, reqs, ctx)
        t0 = time.perf_counter()
        # As the engine calls it in a CUDA graph (max_seq_len unknown, or SHORT_SEQ_LEN in the graph
        # for short requests) and in an eager step.
        row = {"case": name, "kv_bytes": case["kv_bytes"],
               "graph_default_us": time_us(case), "eager_default_us": time_us(case, max_seq_len=case["max_seq_len"]),
               "graph_longest_first_us": time_us(case, order=case["order"])}
        if case["max_seq_len"] <= SHORT_SEQ_LEN:
            row["graph_short_us"] = time_us(case, max_seq_len=SHORT_SEQ_LEN)
        if args.sweep:
            timed = []
            orders = [None, case["order"]] if isinstance(ctx, tuple) else [None]
            for cfg, order in itertools.product(sweep_grid(reqs, kv_heads), orders):
                try:
                    timed.append((time_us(case, **cfg, order=order), cfg | {"longest_first": order is not None}))
                except Exception as exc:  # a tiling that does not fit (shared memory): skip it
                    print(f"  {cfg}: {type(exc).__name__}")
            timed.sort(key=lambda t: t[0])
            row["best"] = [{"us": us, **cfg} for us, cfg in timed[:5]]
        rows.append(row)
        best = row.get("best", [{"us": float("nan")}])[0]
        short = f"  short graph {row['graph_short_us']:5.1f} us" if "graph_short_us" in row else ""
        print(f"{name:28s} graph {row['graph_default_us']:7.1f} us{short}  "
              f"longest first {row['graph_longest_first_us']:7.1f} us  eager {row['eager_default_us']:7.1f} us  "
              f"({case['kv_bytes'] / row['eager_default_us'] / 1e6:5.2f} TB/s)  best {best['us']:7.1f} us "
              f"{ {k: v for k, v in best.items() if k != 'us'} }  [{time.perf_counter() - t0:.0f} s]", flush=True)
        del case
    if args.out:
        write_result(args.out, {"benchmark": "decode_attention", "settings": vars(args) | {"out": str(args.out)},
                                "rows": rows})
    else:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
