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
import time
from pathlib import Path

import torch

from bench.common import write_result, write_shape_dir
from engine.config import EngineArgs
from engine.cuda_graph import GraphShape
from engine.llm_engine import LLMEngine
from engine.model_runner import PendingOutput
from engine.sampling_params import SamplingParams


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
        waits: list[float] = []
        unpatched = PendingOutput.result

        def timed_result(self: PendingOutput):
            start = time.perf_counter()
            out = unpatched(self)
            waits.append(time.perf_counter() - start)
            return out

        PendingOutput.result = timed_result
        params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)
        runs = []
        for run in range(args.runs + 1):
            engine.add_request(f"run-{run}", list(range(2, 130)), params)
            engine.step()  # the prompt
            torch.cuda.synchronize()
            waits.clear()
            steps, start = 0, time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            torch.cuda.synchronize()
            if run:
                runs.append({"step_ms": 1000 * (time.perf_counter() - start) / steps,
                             "host_wait_ms": 1000 * sum(waits) / steps})
                print(f"run {run}: {runs[-1]['step_ms']:.3f} ms a step, host waited "
                      f"{runs[-1]['host_wait_ms']:.3f}", flush=True)
            engine.reset_prefix_cache()
        PendingOutput.result = unpatched
        graphs = engine.runner.graphs
        assert graphs is not None, "needs CUDA graphs"
        graphs.replay(GraphShape(1, 1))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(args.replays):
            graphs.replay(GraphShape(1, 1))
        end.record()
        torch.cuda.synchronize()
        graph_ms = begin.elapsed_time(end) / args.replays
        print(f"decode graph alone: {graph_ms:.3f} ms", flush=True)
    if args.out is not None:
        write_result(args.out, {"benchmark": "single_stream_modes", "settings": vars(args) | {"out": str(args.out)},
                                "runs": runs, "graph_ms": graph_ms})


if __name__ == "__main__":
    main()
