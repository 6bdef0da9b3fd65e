"""cuBLAS's own pick against every algorithm cuBLASLt offers, for the Llama-3.1-8B dense linears at
decode-batch and prefill row counts (bf16, needs a CUDA GPU).

Each product is timed as the engine runs it: captured in a CUDA graph, ``--calls`` products in a
row over weight copies that together exceed the L2 cache (so every call streams its weight from
memory), the fastest of ``--replays`` replays of the graph. Rows: ``F.linear`` (cuBLAS's heuristic),
cuBLASLt's first heuristic result, and the fastest of its ``--algos`` results, which is checked
against ``F.linear``'s output.

    python -m bench.bench_cublaslt [--rows 16 32 64 128 256] [--shapes qkv o] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.bench_gemm_layout import SHAPES
from bench.common import write_result
from bench.cublaslt import LtMatmul, time_product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64, 96, 128, 192, 256, 8192])
    parser.add_argument("--shapes", nargs="*", default=["qkv", "o", "gate_up", "down", "lm_head"])
    parser.add_argument("--algos", type=int, default=32)
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--between", action="store_true",
                        help="a 4 MB in-place add before each product (the engine runs a norm or an "
                        "activation between its linears)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    lt = LtMatmul(device)
    spacer = torch.zeros(1 << 20, device=device)
    between = (lambda: spacer.add_(1.0)) if args.between else None
    rows = []
    for name in args.shapes:
        k, n = SHAPES[name]
        copies = max(2, -(-160_000_000 // (2 * k * n)))
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.rows:
            if name == "lm_head" and m > 1024:  # prompts' logits are taken for their last tokens only
                continue
            calls = args.calls if m <= 1024 else 4
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, weights[0])
            default = time_product(lt, x, weights, out, None, calls, args.replays, between)
            timed = []
            for index, algo in enumerate(lt.algos(m, n, k, torch.bfloat16, args.algos)):
                try:
                    us = time_product(lt, x, weights, out, algo, calls, args.replays, between)
                except RuntimeError as e:
                    print(f"  algo {index}: {e}")
                    continue
                lt.matmul(x, weights[0], out, algo)
                err = (out.float() - ref.float()).abs().max().item()
                timed.append((us, index, algo.waves_count, algo.workspace_size, err))
            best = min(timed)
            first = next(t for t in timed if t[1] == 0) if any(t[1] == 0 for t in timed) else None
            flops = 2 * m * n * k
            row = {"shape": name, "rows": m, "cublas_us": default, "lt_first_us": first[0] if first else None,
                   "lt_best_us": best[0], "lt_best_index": best[1], "lt_best_waves": best[2],
                   "lt_best_workspace": best[3], "lt_best_max_abs_err": best[4], "algos_timed": len(timed),
                   "cublas_tbps": 2 * n * k / default / 1e6, "cublas_tflops": flops / default / 1e6,
                   "lt_best_tbps": 2 * n * k / best[0] / 1e6, "lt_best_tflops": flops / best[0] / 1e6,
                   "all_us": sorted(round(t[0], 2) for t in timed)}
            rows.append(row)
            print(f"{name:8s} M={m:5d} cuBLAS {default:8.2f} us ({row['cublas_tbps']:.2f} TB/s, "
                  f"{row['cublas_tflops']:.0f} TF)  Lt first {row['lt_first_us'] or float('nan'):8.2f}  "
                  f"Lt best {best[0]:8.2f} (#{best[1]}, err {best[4]:.2e}) {default / best[0]:.3f}x", flush=True)
    if args.out:
        write_result(args.out, {"benchmark": "cublaslt_algos", "settings": vars(args) | {"out": str(args.out)},
                                "rows": rows})


if __name__ == "__main__":
    main()
