"""The one-pass temperature-sampling kernel (engine/kernels/sampling.py) on the LM-head shapes of
Qwen3-0.6B (vocabulary 151,936) and Llama-3.1-8B (128,256), replayed from CUDA graphs (needs a
CUDA GPU).

    python -m bench.bench_sampling [--rows 1 64 256] [--chunks 1 2 4 8 --blocks 512 1024] [--out FILE]

Per case, microseconds per sampled batch for: the step as it was (bf16 logits widened to a
float32 copy, then one Philox call per element), the kernel reading bf16 directly with one
Philox call per element, and with one call per four elements (``tl.rand4x``); and the rate
at which each reads the bf16 logits, against the device's copy bandwidth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.bench_awq_linear import copy_bandwidth, graph_us
from bench.common import write_result
from engine.kernels.sampling import gumbel_sample

VOCABS = {"qwen3-0.6b": 151936, "llama-3.1-8b": 128256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 64, 256])
    parser.add_argument("--chunks", type=int, nargs="*", default=[],
                        help="also time the default variant with these chunk counts per row")
    parser.add_argument("--blocks", type=int, nargs="*", default=[], help="... and these tile widths")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows_out = []
    for model, vocab in VOCABS.items():
        for rows in args.rows:
            logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) * 4
            inv_t = torch.full((rows,), 1 / 0.6, device="cuda")
            variants = {
                "fp32_copy_then_rand": lambda x=logits, t=inv_t: gumbel_sample(x.float(), t, 7, rand4x=False),
                "bf16_rand": lambda x=logits, t=inv_t: gumbel_sample(x, t, 7, rand4x=False),
                "bf16_rand4x": lambda x=logits, t=inv_t: gumbel_sample(x, t, 7, rand4x=True),
            }
            for chunks in args.chunks:
                for block in args.blocks or [1024]:
                    variants[f"rand4x_c{chunks}_b{block}"] = (
                        lambda x=logits, t=inv_t, c=chunks, b=block: gumbel_sample(x, t, 7, num_chunks=c, block=b))
            row = {"model": model, "rows": rows, "vocab": vocab}
            for name, call in variants.items():
                us = graph_us([call] * 8)
                row[f"{name}_us"] = us
                row[f"{name}_read_fraction"] = logits.numel() * 2 / (us * 1e-6) / bandwidth
            rows_out.append(row)
            print(f"{model:13s} rows {rows:4d}: " + ", ".join(
                f"{name} {row[f'{name}_us']:.1f} us" for name in variants), flush=True)
    if args.out:
        write_result(args.out, {"copy_bandwidth_tbps": bandwidth / 1e12, "cases": rows_out})


if __name__ == "__main__":
    main()
