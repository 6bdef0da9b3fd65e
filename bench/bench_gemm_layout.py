"""cuBLAS on the Llama-3.1-8B linears, by weight layout: ``F.linear(x, W)`` with the checkpoint's
``W [out, in]`` (what the engine runs) against ``x @ W^T`` with ``W^T [in, out]`` stored contiguous
(another cuBLAS kernel family, no split-K for some shapes), bf16, at decode-batch and prefill row
counts (needs a CUDA GPU; ``triton.testing.do_bench``).

    python -m bench.bench_gemm_layout [--rows 128 256 512 8192] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from triton.testing import do_bench

from bench.common import write_result

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[128, 256, 512, 8192])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for m in args.rows:
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            wt = w.t().contiguous()
            linear = do_bench(lambda x=x, w=w: torch.nn.functional.linear(x, w), rep=100) * 1000
            transposed = do_bench(lambda x=x, wt=wt: torch.mm(x, wt), rep=100) * 1000
            rows.append({"rows": m, "shape": name, "linear_us": linear, "mm_transposed_us": transposed})
            print(f"M={m:5d} {name:8s} F.linear {linear:8.1f} us  x @ W^T contiguous {transposed:8.1f} us "
                  f"({linear / transposed:.3f}x)", flush=True)
    if args.out:
        write_result(args.out, {"benchmark": "gemm_layout", "settings": {"rows": args.rows}, "rows": rows})


if __name__ == "__main__":
    main()
