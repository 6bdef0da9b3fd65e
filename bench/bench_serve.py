"""Serving benchmark over gRPC: open-loop Poisson arrivals against ``sluice serve``.

The workload is bench_offline's (same seed, same ranges: the same requests): ``--num-prompts``
requests with prompt and output lengths uniform in the two ranges, random prompt token ids,
ignore_eos, temperature 0.6. For each ``--request-rate`` (requests/s; ``inf`` sends all at once)
the requests arrive with exponential gaps of mean 1/rate, each streamed by its own asyncio task;
one warm-up request goes first (with ``--full-warmup``, the whole workload at infinite rate: the
kernels' first-use compiles then stay out of the measured runs). The prefix cache is reset before
each rate, so no run hits what an earlier one cached.

Per request: TTFT (send to the first message carrying tokens); ITL, the gap before each later
message carrying tokens (a message carries several tokens when the client reads more slowly
than the engine produces; its gap then counts once, for the message); TPOT = (e2e - TTFT) /
(output tokens - 1); e2e (send to the final message). From the server's side (the final message's
usage, timed from when the server accepted the request): its TTFT, and its queue wait (until the
engine first scheduled the request). The client's TTFT minus the server's is the time the request
took to reach the server plus the first token's trip back.

Without ``--address`` it starts ``sluice serve`` on a free loopback port with the shape's config
and dummy weights (or ``--model``'s checkpoint) and stops it at the end; the result then keeps the
engine loop's stats lines, logged every ``--server-stats-interval`` seconds (where the engine's
time went: model step, outputs, calls, waiting), warm-up included. Every flag this script
does not know goes to ``sluice serve``; ``--server-arg=FLAG`` passes one this script also has.

    python -m bench.bench_serve --shape qwen3-0.6b --request-rate inf 8 16 32 --attention-backend triton \\
        --out bench/results/serve_qwen3-0.6b.json
    python -m bench.bench_serve --address 127.0.0.1:50051 --num-prompts 64 --request-rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from bench.common import SHAPES, percentile, write_result, write_shape_dir
from service.client import AsyncSluiceClient, SluiceClient, make_request
from sluice.v1 import generation_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent
FAILED_REASONS = (pb.FINISH_REASON_ERROR, pb.FINISH_REASON_ABORTED)


@dataclass(slots=True)
class RequestRecord:
    """One request's outcome; times in seconds."""

    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    server_ttft: float = math.nan  # the final message's usage: from the server's acceptance
    server_queue_wait: float = math.nan

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def record_of(send: float, messages: Sequence[tuple[float, int]], prompt_tokens: int, max_tokens: int,
              error: str | None = None, usage: pb.Usage | None = None) -> RequestRecord:
    """A request's record from its send time, the (arrival time, token count) of each message and
    the final message's usage."""
    record = RequestRecord(prompt_tokens, max_tokens, error=error)
    if usage is not None:
        record.server_ttft = usage.time_to_first_token_seconds
        record.server_queue_wait = usage.queue_wait_seconds
    token_times = [t for t, n in messages if n > 0]
    if not token_times:
        record.error = error or "no tokens"
        return record
    record.output_tokens = sum(n for _, n in messages)
    record.ttft = token_times[0] - send
    record.itl = [b - a for a, b in zip(token_times, token_times[1:])]
    record.e2e = messages[-1][0] - send
    return record


def sample_workload(num: int, input_range: Sequence[int], output_range: Sequence[int], vocab_size: int,
                    seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request, drawn in bench_offline's order."""
    rng = random.Random(seed)
    lengths = [(rng.randint(*input_range), rng.randint(*output_range)) for _ in range(num)]
    return [([rng.randrange(2, vocab_size) for _ in range(p)], o) for p, o in lengths]


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process of ``rate``."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(num):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": 1000 * sum(values) / len(values), "p50": 1000 * percentile(list(values), 50),
            "p99": 1000 * percentile(list(values), 99)}


def summarize(records: Sequence[RequestRecord], duration: float) -> dict:
    """One rate's report: counts, throughputs over ``duration`` and latency statistics (ms)."""
    done = [r for r in records if r.error is None]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "length_mismatches": sum(r.output_tokens != r.max_tokens for r in done),
        "errors": sorted({r.error for r in records if r.error is not None})[:10],
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(done) / duration,
        "output_token_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in done]),
        "tpot_ms": _stats_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2e_ms": _stats_ms([r.e2e for r in done]),
        "server_ttft_ms": _stats_ms([r.server_ttft for r in done if not math.isnan(r.server_ttft)]),
        "server_queue_wait_ms": _stats_ms([r.server_queue_wait for r in done if not math.isnan(r.server_queue_wait)]),
    }


class _LineProgress:
    """The progress bar when tqdm is not installed: one rewritten stderr line."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr)


async def _send(client: AsyncSluiceClient, request: pb.GenerateRequest, limit: asyncio.Semaphore | None,
                progress=None) -> RequestRecord:
    messages: list[tuple[float, int]] = []
    error = usage = None
    async with limit or contextlib.nullcontext():
        send = time.perf_counter()
        try:
            async for delta in client.generate(request):
                messages.append((time.perf_counter(), len(delta.token_ids)))
                if delta.HasField("usage"):
                    usage = delta.usage
                if delta.finish_reason in FAILED_REASONS:
                    error = f"{pb.FinishReason.Name(delta.finish_reason)}: {delta.error.message}"
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
    if progress is not None:
        progress.update(1)
    return record_of(send, messages, len(request.token_ids), request.max_tokens, error, usage)


def _request(prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return make_request(prompt, temperature=0.6, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


async def run_rate(client: AsyncSluiceClient, workload: list[tuple[list[int], int]], rate: float,
                   args: argparse.Namespace) -> dict:
    """Send the workload at ``rate`` requests/s (open loop) and report on it."""
    requests = [_request(prompt, max_tokens) for prompt, max_tokens in workload]
    offsets = arrival_offsets(len(requests), rate, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    progress = _progress(len(requests), f"rate {_rate_label(rate)}")
    tasks = []
    start = time.perf_counter()
    for request, offset in zip(requests, offsets):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(_send(client, request, limit, progress)))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return {"request_rate": _rate_label(rate), "max_concurrency": args.max_concurrency,
            **summarize(records, duration)}


async def benchmark(address: str, args: argparse.Namespace) -> dict:
    async with AsyncSluiceClient(address) as client:
        info = await client.model_info()
        longest = args.input_len_range[1] + args.output_len_range[1]
        if longest > info.max_model_len:
            raise SystemExit(f"bench_serve: prompt + output up to {longest} tokens exceeds the server's "
                             f"max_model_len {info.max_model_len}")
        workload = sample_workload(args.num_prompts, args.input_len_range, args.output_len_range,
                                   info.vocab_size, args.seed)
        warm = await _send(client, _request(workload[0][0], 16), None)
        if warm.error is not None:
            raise SystemExit(f"bench_serve: the warm-up request failed: {warm.error}")
        if args.full_warmup:
            # Kernels compile per shape on first use: warm up on the workload itself.
            await run_rate(client, workload, math.inf, args)
        runs = []
        for rate in args.request_rate:
            # Every rate sends the same prompts: none may hit what an earlier run cached.
            await client.reset_prefix_cache()
            runs.append(await run_rate(client, workload, rate, args))
    model_info = MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {"model_info": model_info, "runs": runs}


def _rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(address: str) -> str:
    with SluiceClient(address, timeout=1.0) as client:  # a fresh channel: no reconnect backoff to wait out
        try:
            return client.health()
        except grpc.RpcError:
            return "UNREACHABLE"


@contextlib.contextmanager
def sluice_serve(args: argparse.Namespace, server_flags: list[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """Start ``sluice serve`` on loopback, wait for SERVING; yields (address, command, stats); SIGTERM
    at exit, when ``stats`` receives the log's engine-loop stats lines."""
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model).resolve() if args.model else write_shape_dir(args.shape, Path(tmp) / args.shape)
        port = _free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), *([] if args.model else ["--load-format", "dummy"]), *server_flags]
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if args.server_stats_interval > 0:
                env["SLUICE_LOG_STATS_INTERVAL"] = str(args.server_stats_interval)
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        stats: list[str] = []
        address = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + args.server_start_timeout
            while _health(address) != "SERVING":
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sluice serve did not come up ({' '.join(cmd)}):\n"
                                       f"{log_path.read_text(errors='replace')[-4000:]}")
                time.sleep(0.2)
            yield address, cmd, stats
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            stats.extend(line[line.index("engine loop: "):] for line in
                         log_path.read_text(errors="replace").splitlines() if "engine loop: " in line)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's settings, and the flags for ``sluice serve`` (unknown ones and --server-arg)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--model", help="serve this checkpoint directory instead of the shape's dummy weights")
    parser.add_argument("--address", metavar="HOST:PORT", help="benchmark a running server instead")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="one argument for sluice serve, as --server-arg=--seed=3")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                        help="requests/s, one run each; inf sends all at once (default: inf)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-stats-interval", type=float, default=1.0,
                        help="seconds between the started server's engine-loop stats lines (0: its default)")
    parser.add_argument("--full-warmup", action="store_true",
                        help="warm up on the whole workload at infinite rate before measuring")
    parser.add_argument("--server-start-timeout", type=float, default=900.0, help="seconds (default: 900)")
    parser.add_argument("--out", type=Path, default=None)
    args, unknown = parser.parse_known_args(argv)
    server_flags = unknown + args.server_arg
    if args.address and server_flags:
        parser.error(f"server flags {server_flags} need a server started here (no --address)")
    if any(rate <= 0 for rate in args.request_rate):
        parser.error("--request-rate must be > 0")
    return args, server_flags


def print_table(runs: list[dict]) -> None:
    latencies = ("TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "e2e p50", "srvTTFT50")
    print(f"{'rate':>6} {'done':>5} {'fail':>5} {'dur s':>7} {'req/s':>7} {'out tok/s':>10} "
          + " ".join(f"{name:>9}" for name in latencies) + "  (ms)")
    for r in runs:
        cells = [r[m][q] for m, q in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"),
                                      ("tpot_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99"), ("e2e_ms", "p50"),
                                      ("server_ttft_ms", "p50"))]
        print(f"{r['request_rate']!s:>6} {r['completed']:>5} {r['failed']:>5} {r['duration_s']:>7.1f} "
              f"{r['request_throughput']:>7.2f} {r['output_token_throughput']:>10.1f} "
              + " ".join(f"{math.nan if c is None else c:>9.1f}" for c in cells))
        if r["failed"] or r["length_mismatches"]:
            print(f"       {r['failed']} failed, {r['length_mismatches']} with output length != max_tokens: "
                  f"{r['errors']}")


def main(argv: Sequence[str] | None = None) -> dict:
    args, server_flags = parse_args(argv)
    with contextlib.ExitStack() as stack:
        address, command, stats = (args.address, None, []) if args.address else stack.enter_context(
            sluice_serve(args, server_flags))
        result = asyncio.run(benchmark(address, args))
    print_table(result["runs"])
    settings = vars(args) | {"out": str(args.out) if args.out else None, "server_flags": server_flags,
                             "request_rate": [_rate_label(r) for r in args.request_rate]}
    result = {"benchmark": "serve", "settings": settings, "server_command": command, **result,
              "server_stats": stats}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
