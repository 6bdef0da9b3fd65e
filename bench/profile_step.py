"""Where a step's time goes: the host (cProfile of the engine loop) and the device (the
kernels of a few steps, from torch.profiler), for one workload on one shape.

    python -m bench.profile_step --shape qwen3-0.6b --num-requests 64 --max-len 512 [--enforce-eager]
    python -m bench.profile_step --shape llama-3.1-8b --single [--async-scheduling] [--awq]
    python -m bench.profile_step --shape qwen3-0.6b --prefill --async-scheduling
    python -m bench.profile_step --shape llama-3.1-8b --offline --num-requests 256 --max-len 1024 --async-scheduling

Prints the top host functions by own time, the top kernels by device time, and the mean step
wall time of decode-only steps. ``--single``: one greedy stream (128 prompt, 256 new tokens),
and how its step time splits between the device (one decode graph replayed alone) and the rest;
the host's wait for the device's tokens a step (about none: the host is the bottleneck) and the
host time of one graph launch; then the decode graph's kernels by their place in a decoder layer
(``chain_table``): how far each pushed the device's timeline, which is where a step's time goes
when programmatic dependent launch overlaps a kernel's start with the kernel ahead.
``--prefill``: the host time of one 128-token prompt's step, and where it goes.
``--offline`` (with ``--async-scheduling``): bench_offline's workload; per step, by the number
of requests it samples, the wall time and how much of it the host spent waiting for the device
(none: the host is the bottleneck; most: the device is).
``--full-batch``: ``--num-requests`` prompts (lengths as bench_offline's) decoding together once
every prompt is in: the decode step's wall time, its host functions (cProfile) and its kernels
(torch.profiler: by device time, and by place in a layer as ``--single``'s chain table).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.common import recorded_host_waits, timed_single_stream, write_shape_dir
from engine.config import EngineArgs
from engine.cuda_graph import ONE_REQUEST_DECODE
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def _add(engine: LLMEngine, args: argparse.Namespace, num: int, tag: str, max_tokens: int | None = None) -> None:
    """``num`` requests of bench_offline's lengths (outputs of ``max_tokens`` if given)."""
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    for i in range(num):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
        out = rng.randint(args.min_len, args.max_len)
        params = SamplingParams(temperature=args.temperature, max_tokens=max_tokens or out,
                                ignore_eos=True, detokenize=False)
        engine.add_request(f"{tag}-{i}", prompt, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--awq", action="store_true", help="random AWQ 4-bit weights in the shape (AutoAWQ GEMM)")
    parser.add_argument("--single", action="store_true", help="one stream: step wall time against graph replay time")
    parser.add_argument("--prefill", action="store_true",
                        help="one 128-token prompt's step: its host time and where it goes (cProfile)")
    parser.add_argument("--offline", action="store_true",
                        help="bench_offline's workload: step wall time and the host's wait for the device, by batch")
    parser.add_argument("--max-cuda-graph-prefill-tokens", type=int, default=EngineArgs.max_cuda_graph_prefill_tokens)
    parser.add_argument("--full-batch", action="store_true",
                        help="decode steps of --num-requests requests at once: wall, host functions, kernels")
    parser.add_argument("--out", type=Path, default=None, help="--offline: write the table as JSON")
    parser.add_argument("--single-after", action="store_true",
                        help="after the run, profile one greedy stream (128 prompt, 256 new tokens) instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = LLMEngine(EngineArgs(
            model=str(write_shape_dir(args.shape, Path(tmp), awq=args.awq)), load_format="dummy",
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=2 * args.max_len + 16,
            attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
            async_scheduling=args.async_scheduling, max_cuda_graph_prefill_tokens=args.max_cuda_graph_prefill_tokens,
        ))
    if args.single:
        return single_stream(engine)
    if args.prefill:
        return prompt_step(engine, args.top)
    if args.offline:
        return offline_waits(engine, args)
    if args.full_batch:
        return full_batch(engine, args)
    _add(engine, args, 4, "warm")
    while engine.has_unfinished_requests():
        engine.step()

    # Host: the whole run under cProfile; step times split by kind.
    _add(engine, args, args.num_requests, "run")
    if args.single_after:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        print(f"run without profiling: {time.perf_counter() - start:.2f} s")
        engine.add_request("single", list(range(2, 130)), SamplingParams(
            temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False))
    decode_times: list[float] = []
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    while engine.has_unfinished_requests():
        before = engine.scheduler.num_waiting
        t0 = time.perf_counter()
        engine.step()
        if before == 0:
            decode_times.append(time.perf_counter() - t0)
    profiler.disable()
    wall = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    print(f"run: {wall:.2f} s wall (under cProfile); {len(decode_times)} steps with no waiting request, "
          f"mean {1000 * sum(decode_times) / max(len(decode_times), 1):.2f} ms")

    # Device: a few steps of a fresh run (prefill and decode) under torch.profiler.
    if torch.cuda.is_available():
        _add(engine, args, args.num_requests, "prof")
        _profile_steps(engine, warm=3, steps=12, top=args.top)
        engine.abort_request([f"prof-{i}" for i in range(args.num_requests)])
        engine.step()


def _profile_steps(engine: LLMEngine, warm: int, steps: int, top: int, chain: bool = False) -> None:
    """``warm`` steps, then ``steps`` under torch.profiler: the top ops by host and by device time;
    with ``chain``, the device ops by their place in a layer as well (``chain_table``)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warm):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        _sync()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    # Every kernel, by device time, with its launches per step: the row limit must not hide the
    # many small kernels whose sum matters at batch 1.
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in kernels)
    print(f"device time {total / steps / 1000:.3f} ms per step over {steps} steps; "
          f"{sum(e.count for e in kernels) / steps:.0f} device ops per step")
    print(f"{'us/step':>9} {'share':>6} {'n/step':>7} {'us each':>8}  kernel")
    for e in kernels[:max(top, 60)]:
        print(f"{e.self_device_time_total / steps:9.1f} {e.self_device_time_total / total:6.1%} "
              f"{e.count / steps:7.1f} {e.self_device_time_total / e.count:8.2f}  {e.key[:100]}")
    if chain:
        ops = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
        print(chain_table(sorted(ops, key=lambda op: op[1]), steps))


def chain_shares(ops: list[tuple[str, float, float]]) -> list[tuple[float, float, float]]:
    """Device ops ``(name, start, end)`` in start order -> per op ``(extends, idle, lead)``: how far
    it pushed the end of the timeline (``end`` past every earlier op's end, once it or the device
    was busy), the idle time before it started, and how long before the ops ahead had finished it
    started (its programs placed early and waiting, under programmatic dependent launch). The
    ``extends`` and ``idle`` of all ops sum to the span from the first start to the last end."""
    shares, done = [], None
    for _, start, end in ops:
        if done is None:
            shares.append((end - start, 0.0, 0.0))
            done = end
            continue
        shares.append((max(end - max(done, start), 0.0), max(start - done, 0.0), max(done - start, 0.0)))
        done = max(done, end)
    return shares


def layer_period(names: list[str], longest: int = 64) -> int:
    """The number of ops a decoder layer launches: the shortest period that most of the sequence
    of op names repeats with (0 if none covers half of it)."""
    best, best_hits = 0, len(names) // 2
    for p in range(2, min(longest, len(names) // 2) + 1):
        hits = sum(a == b for a, b in zip(names, names[p:]))
        if hits > best_hits * 1.05:  # a multiple of the period matches as well: keep the shortest
            best, best_hits = p, hits
    return best


def chain_table(ops: list[tuple[str, float, float]], steps: int) -> str:
    """The ops of ``steps`` decode steps (``(name, start, end)`` in start order, times in us) by
    their place in a layer: runs of ops that repeat with the layer's period are the layers, their
    ops numbered from each run's first; everything else (embedding, LM head, sampling, copies) is
    listed by name. Per place: us a step by which it extended the timeline, its mean duration and
    its mean lead (started before the ops ahead finished)."""
    names = [name for name, _, _ in ops]
    period = layer_period(names)
    shares = chain_shares(ops)
    rows: dict[tuple[int, str], list[float]] = {}
    in_layers = [bool(period) and ((i + period < len(names) and names[i] == names[i + period])
                                   or (i >= period and names[i] == names[i - period])) for i in range(len(names))]
    run_start = 0
    for i, ((name, start, end), (extends, idle, lead)) in enumerate(zip(ops, shares, strict=True)):
        if in_layers[i] and (i == 0 or not in_layers[i - 1]):
            run_start = i
        key = ((i - run_start) % period, name) if in_layers[i] else (-1, name)
        row = rows.setdefault(key, [0, 0.0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += extends
        row[2] += idle
        row[3] += end - start
        row[4] += lead
    span = sum(e + i for e, i, _ in shares) / steps
    lines = [f"decode timeline: {span:.1f} us a step over {steps} steps, a layer {period} ops "
             f"(place -1: outside the layers)",
             f"{'place':>5} {'n/step':>7} {'extends us/step':>16} {'idle us/step':>13} {'mean us':>8} "
             f"{'lead us':>8}  op"]
    for (place, name), (count, extends, idle, duration, lead) in sorted(rows.items()):
        lines.append(f"{place:5d} {count / steps:7.1f} {extends / steps:16.1f} {idle / steps:13.1f} "
                     f"{duration / count:8.2f} {lead / count:8.2f}  {name[:80]}")
    return "\n".join(lines)


def prompt_step(engine: LLMEngine, top: int) -> None:
    """The step that computes one 128-token prompt (a prefill graph's replay; eagerly with
    ``--max-cuda-graph-prefill-tokens 0`` or ``--enforce-eager``):
    the host's time until ``step()`` returns and until the device is done, five times after a
    warm-up, then the same step under cProfile."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)

    def once(profiler: cProfile.Profile | None = None) -> tuple[float, float]:
        engine.reset_prefix_cache()
        engine.add_request(f"prompt-{time.monotonic_ns()}", list(range(2, 130)), params)
        _sync()
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        engine.step()
        if profiler is not None:
            profiler.disable()
        host = time.perf_counter() - start
        _sync()
        done = time.perf_counter() - start
        while engine.has_unfinished_requests():
            engine.step()
        return 1000 * host, 1000 * done

    once()
    for _ in range(5):
        host, done = once()
        print(f"prompt step: host {host:.2f} ms, device done {done:.2f} ms")
    profiler = cProfile.Profile()
    host, done = once(profiler)
    print(f"under cProfile: host {host:.2f} ms, device done {done:.2f} ms")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumtime").print_stats(top)
    print(text.getvalue())


def offline_waits(engine: LLMEngine, args: argparse.Namespace) -> None:
    """bench_offline's workload (after a warm-up run of it): for the steps that sample n requests,
    grouped by n, the mean step wall time and the host's mean wait for the device's tokens."""
    from bench.bench_offline import offline_throughput

    assert args.async_scheduling, "--offline measures the asynchronous engine's waits"
    workload = argparse.Namespace(seed=args.seed, num_requests=args.num_requests, min_len=args.min_len,
                                  max_len=args.max_len)
    with recorded_host_waits() as results:  # (requests sampled, wait, when the wait began)
        offline = offline_throughput(engine, workload)  # its warm-up run is recorded too: dropped below
    steps = results[len(results) // 2:]  # the two runs schedule alike: the second half is the measured run
    buckets: dict[int, list[float]] = {}
    for (n, wait, start), following in zip(steps, steps[1:], strict=False):
        b = buckets.setdefault(min(n // 32 * 32, 256), [0, 0.0, 0.0])
        b[0] += 1
        b[1] += following[2] - start
        b[2] += wait
    print(f"offline: {offline['output_tokens_per_s']:.1f} output tok/s, {offline['wall_s']:.2f} s")
    rows = []
    for bucket, (count, wall, wait) in sorted(buckets.items()):
        rows.append({"sampled_requests_from": bucket, "steps": count, "ms_per_step": 1000 * wall / count,
                     "wait_ms_per_step": 1000 * wait / count})
        print(f"steps sampling {bucket:3d}+ requests: {count:5d}, {1000 * wall / count:7.2f} ms each, "
              f"waiting for the device {1000 * wait / count:6.2f} ms")
    if args.out:
        from bench.common import write_result

        write_result(args.out, {"benchmark": "offline_waits", "settings": vars(args) | {"out": str(args.out)},
                                "offline_throughput": offline, "rows": rows})


def full_batch(engine: LLMEngine, args: argparse.Namespace, steps: int = 20) -> None:
    """``args.num_requests`` requests decoding together after their prompts: ``steps`` decode steps
    timed, ``steps`` more under cProfile, then half as many under torch.profiler (kernels by device
    time, and by how far each pushed the timeline: ``chain_table``)."""
    _add(engine, args, 8, "warm")
    while engine.has_unfinished_requests():
        engine.step()
    _add(engine, args, args.num_requests, "batch", max_tokens=args.max_len)  # nobody finishes while measured
    batch = min(args.num_requests, engine.scheduler.config.max_num_seqs)
    for _ in range(10_000):
        if engine.scheduler.num_running >= batch:
            break
        engine.step()
    else:
        raise SystemExit(f"{batch} requests never ran at once (too few KV blocks?)")
    for _ in range(4):  # the last prompt's chunk, then decode alone
        engine.step()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync()
    print(f"decode step wall at {batch} requests: {1000 * (time.perf_counter() - start) / steps:.2f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    if torch.cuda.is_available():
        _profile_steps(engine, warm=0, steps=steps // 2, top=args.top, chain=True)
    engine.abort_request([f"batch-{i}" for i in range(args.num_requests)])
    engine.step()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def single_stream(engine: LLMEngine) -> None:
    """Decode step wall time of one stream against the device time of its graph alone, and the
    host's share: how long a step waited for the device's tokens (with asynchronous scheduling,
    about none when the host is the bottleneck) and the host time of one graph launch."""
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)
    step_ms, wait_ms = zip(*timed_single_stream(engine, runs=2), strict=True)
    graphs = engine.runner.graphs
    replay_ms = launch_ms = float("nan")
    if graphs is not None:
        replays, begin, end = 100, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graphs.replay(ONE_REQUEST_DECODE)
        begin.record()
        start = time.perf_counter()
        for i in range(replays):
            graphs.replay(ONE_REQUEST_DECODE)
            if i == 19:  # the first 20 launches, well ahead of the device
                launch_ms = 1000 * (time.perf_counter() - start) / 20
        end.record()
        torch.cuda.synchronize()
        replay_ms = begin.elapsed_time(end) / replays
    best = min(range(len(step_ms)), key=step_ms.__getitem__)
    wall, wait = step_ms[best], wait_ms[best]
    print(f"single stream: {wall:.3f} ms per step ({1000 / wall:.1f} tokens/s); decode graph alone "
          f"{replay_ms:.3f} ms ({1000 / replay_ms:.1f} tokens/s); the rest {wall - replay_ms:.3f} ms")
    print(f"host: waited for the device {wait:.3f} ms a step, busy {wall - wait:.3f} ms; one graph launch "
          f"{launch_ms:.3f} ms of host time")
    engine.add_request("single-prof", list(range(2, 130)), params)
    _profile_steps(engine, warm=8, steps=10, top=30, chain=True)
    engine.abort_request(["single-prof"])
    engine.step()


if __name__ == "__main__":
    main()
