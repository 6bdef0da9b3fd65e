"""The dense few-token GEMV (engine/kernels/gemv.py) against bf16 ``F.linear`` (cuBLAS) on the
linear shapes of Qwen3-0.6B and Llama-3.1-8B, replayed from CUDA graphs over enough weight
copies that the weights stream from memory (needs a CUDA GPU).

    python -m bench.bench_gemv [--tokens 1 4] [--sweep] [--out FILE]

Reports microseconds per call and the weight bytes streamed per second; ``--sweep`` times a
grid of tilings per case and records the best.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.bench_awq_linear import copies_for, copy_bandwidth, graph_us
from bench.common import write_result
from engine.kernels.gemv import GemvConfig, default_config, gemv

# name -> (K in, N out), fused q|k|v and gate|up as the engine runs them.
SHAPES = {
    "0.6b qkv": (1024, 4096), "0.6b o": (2048, 1024), "0.6b gate_up": (1024, 6144), "0.6b down": (3072, 1024),
    "8b qkv": (4096, 6144), "8b o": (4096, 4096), "8b gate_up": (4096, 28672), "8b down": (14336, 4096),
}
TILES = ((4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256))


def sweep_grid(m: int, n: int, k: int) -> list[GemvConfig]:
    grid = []
    for (bn, bk), warps, split in itertools.product(TILES, (4, 8), (1, 2, 4)):
        if m > 1 and bn * bk > 4096:  # four fp32 accumulator tiles must fit the registers
            continue
        if k % (bk * split) or -(-n // bn) * split > 16 * 132:
            continue
        grid.append(GemvConfig(bn, bk, split, warps))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for name in args.shapes:
        k, n = SHAPES[name]
        nbytes = k * n * 2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(nbytes))]
        for m in args.tokens:
            t0 = time.perf_counter()
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ weights[0].float().T
            err = ((gemv(x, weights[0]).float() - ref).norm() / ref.norm()).item()
            row = {"shape": name, "k": k, "n": n, "tokens": m, "rel_err_vs_fp32": err,
                   "cublas_us": graph_us([lambda w=w, x=x: F.linear(x, w) for w in weights]),
                   "gemv_default_us": graph_us([lambda w=w, x=x: gemv(x, w) for w in weights]),
                   "default_config": list(default_config(n, k))}
            if args.sweep:
                timed = []
                for cfg in sweep_grid(m, n, k):
                    try:
                        timed.append((graph_us([lambda w=w, c=cfg, x=x: gemv(x, w, c) for w in weights]), cfg))
                    except Exception as exc:  # out of registers / shared memory: skip the tiling
                        print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                timed.sort(key=lambda t: t[0])
                row["best"] = [{"us": us, "config": list(c)} for us, c in timed[:5]]
            best_us = row["best"][0]["us"] if "best" in row else row["gemv_default_us"]
            row["weight_tbps_best"] = nbytes / best_us / 1e6
            row["bandwidth_fraction_best"] = nbytes / (best_us * 1e-6) / bandwidth
            rows.append(row)
            best_cfg = row["best"][0]["config"] if "best" in row else "-"
            print(f"{name:13s} M={m}: cuBLAS {row['cublas_us']:6.1f} us ({nbytes / row['cublas_us'] / 1e6:4.2f} TB/s)"
                  f"  gemv default {row['gemv_default_us']:6.1f}  best {best_us:6.1f} us "
                  f"({row['weight_tbps_best']:4.2f} TB/s) {best_cfg}  err {err:.1e}  "
                  f"[{time.perf_counter() - t0:.0f} s]",
                  flush=True)
        del weights
    if args.out:
        write_result(args.out, {"benchmark": "gemv", "settings": vars(args) | {"out": str(args.out)},
                                "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
