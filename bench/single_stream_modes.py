"""Where a single stream's step time moves from run to run and process to process: each run's
step wall time and the host's wait for the device a step, then the one-request decode graph
replayed alone, at bench_offline's engine settings (the model's own context length, unlike
profile_step's). Run it in several processes to compare them.

    python -m bench.single_stream_modes --shape qwen3-0.6b --out bench/results/single_mode_p1.json

A run whose step slows while the host's wait falls lost time on the host; a process whose graph
alone is slower lost it on the device.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import timed_single_stream, write_result, write_shape_dir
from engine.config import EngineArgs
from engine.cuda_graph import ONE_REQUEST_DECODE
from engine.llm_engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--awq", action="store_true")
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run")
    parser.add_argument("--replays", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = LLMEngine(EngineArgs(model=str(write_shape_dir(args.shape, Path(tmp), awq=args.awq)),
                                      load_format="dummy", attention_backend=args.attention_backend,
                                      async_scheduling=True))
        runs = [{"step_ms": step, "host_wait_ms": wait} for step, wait in timed_single_stream(engine, args.runs)]
        for i, run in enumerate(runs, 1):
            print(f"run {i}: {run['step_ms']:.3f} ms a step, host waited {run['host_wait_ms']:.3f}", flush=True)
        graphs = engine.runner.graphs
        assert graphs is not None, "needs CUDA graphs"
        graphs.replay(ONE_REQUEST_DECODE)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(args.replays):
            graphs.replay(ONE_REQUEST_DECODE)
        end.record()
        torch.cuda.synchronize()
        graph_ms = begin.elapsed_time(end) / args.replays
        print(f"decode graph alone: {graph_ms:.3f} ms", flush=True)
    if args.out is not None:
        write_result(args.out, {"benchmark": "single_stream_modes", "settings": vars(args) | {"out": str(args.out)},
                                "runs": runs, "graph_ms": graph_ms})


if __name__ == "__main__":
    main()
