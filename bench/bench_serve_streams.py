"""Decode speed through a running ``sluice serve``: one stream, then N concurrent streams.

    sluice serve &   # the bundled model, or --model PATH
    python -m bench.bench_serve_streams --address 127.0.0.1:50051 --streams 8 --out bench/results/serve_streams_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.common import write_result
from service.client import AsyncSluiceClient

PROMPTS = ["def read_lines(path):", "class Stack:", "import os\n\ndef walk(root):", "def parse_args(argv):"]


async def _stream(client: AsyncSluiceClient, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    first = None
    tokens = 0
    async for delta in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        if delta.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += len(delta.token_ids)
    return tokens, first or 0.0, time.perf_counter() - start


async def _run(address: str, streams: int, max_tokens: int) -> dict:
    async with AsyncSluiceClient(address, timeout=600) as client:
        await _stream(client, PROMPTS[0], 8)  # warm-up
        single_tokens, single_ttft, single_wall = await _stream(client, PROMPTS[0], max_tokens)
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(streams)))
        wall = time.perf_counter() - start
    return {
        "single_stream": {"tokens": single_tokens, "ttft_s": single_ttft, "wall_s": single_wall,
                          "decode_tokens_per_s": (single_tokens - 1) / (single_wall - single_ttft)},
        "concurrent": {"streams": streams, "tokens": sum(r[0] for r in results), "wall_s": wall,
                       "aggregate_tokens_per_s": sum(r[0] for r in results) / wall},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(_run(args.address, args.streams, args.max_tokens))
    print(f"single stream: {result['single_stream']['decode_tokens_per_s']:.1f} tok/s decode, "
          f"TTFT {result['single_stream']['ttft_s'] * 1000:.0f} ms; {args.streams} streams: "
          f"{result['concurrent']['aggregate_tokens_per_s']:.1f} tok/s aggregate")
    if args.out:
        write_result(args.out, {"benchmark": "serve_streams", "settings": vars(args) | {"out": str(args.out)},
                                "results": result})


if __name__ == "__main__":
    main()
