"""Load: N concurrent streaming clients for D seconds against ``sluice serve``, each sending one
request after another. Every request must end in a final message or a clear gRPC status: none
lost (the stream ends without a final message) and none hung (the client's deadline passes).

Afterwards the server must be idle: GetLoad shows no request running or waiting and no KV block
in use (blocks kept by the prefix cache count as free). The server's resident memory is sampled
before, during and after. Throughput and latency percentiles (TTFT, time per output token,
end to end) go to the JSON result.

Without ``--address`` it starts ``sluice serve`` (``--model``, default the bundled model) on a
free loopback port, and at the end stops it with SIGTERM and records its exit code.

    python -m bench.bench_load --clients 200 --duration 60 --out bench/results/load_cpu.json
    python -m bench.bench_load --address 127.0.0.1:50051 --server-pid 1234 --clients 50 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import percentile, write_result
from service.client import auth_metadata, make_request
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc

PROMPTS = ["def read_lines(path):", "class Stack:\n    def __init__(self):", "import os\n\ndef walk(root):",
           "def parse_args(argv):", "# Return the n-th Fibonacci number\ndef fib(n):", "for line in f:"]
# How a request ended: a final message (completed, aborted, failed), a gRPC status before any
# token (refused) or after some (broken); lost and hung must never happen.
COMPLETED, ABORTED, FAILED, REFUSED, BROKEN = "completed", "aborted", "failed", "refused", "broken"
LOST, HUNG = "lost", "hung"
_FINAL = {pb.FINISH_REASON_STOP: COMPLETED, pb.FINISH_REASON_LENGTH: COMPLETED,
          pb.FINISH_REASON_ABORTED: ABORTED, pb.FINISH_REASON_ERROR: FAILED}
# Back-off after a refusal (a draining or unreachable server), so that clients do not spin.
REFUSED_BACKOFF_S = 0.1


@dataclass(slots=True)
class RequestRecord:
    """One request as its client saw it (times in seconds since the load began)."""

    start: float
    end: float = 0.0
    first_token: float | None = None
    tokens: int = 0
    outcome: str = LOST
    status: str = "OK"  # the gRPC status code's name when the call failed
    details: str = ""  # and its message
    usage_tokens: int | None = None  # completion_tokens of the final message

    @property
    def accepted(self) -> bool:
        """The server took it: a message arrived, or it ended with a final message."""
        return self.first_token is not None or self.outcome in (COMPLETED, ABORTED, FAILED)


@dataclass(slots=True)
class LoadSettings:
    clients: int = 200
    duration_s: float = 60.0
    connections: int = 8  # HTTP/2 connections the clients are spread over
    min_tokens: int = 16  # max_tokens of each request is uniform in [min_tokens, max_tokens]
    max_tokens: int = 64
    request_timeout_s: float = 300.0  # a request still streaming after this counts as hung
    seed: int = 0
    api_key: str | None = None


@dataclass(slots=True)
class LoadReport:
    settings: LoadSettings
    began: float  # time.monotonic() when the clients started; records count from it
    wall_s: float
    records: list[RequestRecord]
    rss_mib: dict[str, float] = field(default_factory=dict)
    load_after: dict[str, float] = field(default_factory=dict)
    idle_after_s: float | None = None  # seconds until GetLoad showed the server idle; None: never

    def outcomes(self) -> dict[str, int]:
        return dict(Counter(f"{r.outcome}:{r.status}" if r.outcome in (REFUSED, BROKEN) else r.outcome
                            for r in self.records))

    def summary(self) -> dict[str, object]:
        done = [r for r in self.records if r.outcome == COMPLETED]
        tokens = sum(r.tokens for r in done)
        ttft = [r.first_token - r.start for r in done if r.first_token is not None]
        e2e = [r.end - r.start for r in done]
        tpot = [(r.end - r.first_token) / (r.tokens - 1) for r in done if r.first_token is not None and r.tokens > 1]
        return {
            "requests": len(self.records),
            "outcomes": self.outcomes(),
            "lost": sum(r.outcome == LOST for r in self.records),
            "hung": sum(r.outcome == HUNG for r in self.records),
            "usage_mismatches": sum(r.usage_tokens is not None and r.usage_tokens != r.tokens for r in done),
            "completed_per_s": len(done) / self.wall_s,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / self.wall_s,
            "latency_s": {name: _percentiles(values) for name, values in
                          (("ttft", ttft), ("tpot", tpot), ("e2e", e2e))},
            "rss_mib": self.rss_mib,
            "load_after": self.load_after,
            "idle_after_s": self.idle_after_s,
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)} | {"max": max(values, default=float("nan"))}


def rss_mib(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (Linux), None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _one_request(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, settings: LoadSettings,
                       began: float) -> RequestRecord:
    record = RequestRecord(start=time.monotonic() - began)
    call = stub.Generate(request, timeout=settings.request_timeout_s, metadata=auth_metadata(settings.api_key))
    try:
        async for response in call:
            if response.token_ids and record.first_token is None:
                record.first_token = time.monotonic() - began
            record.tokens += len(response.token_ids)
            if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                record.outcome = _FINAL[response.finish_reason]
                record.usage_tokens = response.usage.completion_tokens
    except grpc.RpcError as exc:
        record.status = exc.code().name
        record.details = exc.details() or ""
        record.outcome = HUNG if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else (
            BROKEN if record.first_token is not None else REFUSED)
    record.end = time.monotonic() - began
    return record


async def _client(stub: pb_grpc.GenerationStub, index: int, settings: LoadSettings, began: float,
                  records: list[RequestRecord]) -> None:
    rng = random.Random(settings.seed * 100_003 + index)
    number = 0
    while time.monotonic() - began < settings.duration_s:
        prompt = f"{rng.choice(PROMPTS)}  # client {index} request {number}\n"
        request = make_request(prompt, request_id=f"load-{index}-{number}", temperature=0.8,
                               seed=rng.randrange(2**31), max_tokens=rng.randint(settings.min_tokens,
                                                                                 settings.max_tokens))
        record = await _one_request(stub, request, settings, began)
        records.append(record)
        number += 1
        if record.outcome == REFUSED:
            await asyncio.sleep(REFUSED_BACKOFF_S)


async def _sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        if (value := rss_mib(pid)) is not None:
            samples.append(value)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def wait_idle(stub: pb_grpc.GenerationStub, timeout_s: float,
                    api_key: str | None = None) -> tuple[pb.Load, float | None]:
    """Poll GetLoad until nothing runs or waits and no KV block is used; (last load, seconds or None)."""
    start = time.monotonic()
    while True:
        load = await stub.GetLoad(pb.GetLoadRequest(), timeout=10, metadata=auth_metadata(api_key))
        if load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_used == 0:
            return load, time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return load, None
        await asyncio.sleep(0.1)


async def run_load(address: str, settings: LoadSettings, server_pid: int | None = None,
                   check_idle: bool = True) -> LoadReport:
    """Run the clients for ``settings.duration_s``, let their last requests end, then (with
    ``check_idle``) wait for the server to be idle."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(settings.connections)]
    stubs = [pb_grpc.GenerationStub(c) for c in channels]
    records: list[RequestRecord] = []
    rss: list[float] = []
    rss_before = rss_mib(server_pid) if server_pid else None
    stop_sampling = asyncio.Event()
    sampler = asyncio.ensure_future(_sample_rss(server_pid, rss, stop_sampling)) if server_pid else None
    began = time.monotonic()
    try:
        await asyncio.gather(*(_client(stubs[i % len(stubs)], i, settings, began, records)
                               for i in range(settings.clients)))
        wall = time.monotonic() - began
        report = LoadReport(settings, began, wall, records)
        if check_idle:
            load, report.idle_after_s = await wait_idle(stubs[0], 60.0, settings.api_key)
            report.load_after = {"num_running": load.num_running, "num_waiting": load.num_waiting,
                                 "kv_blocks_used": load.kv_blocks_used, "kv_blocks_total": load.kv_blocks_total,
                                 "prefix_cache_hit_rate": load.prefix_cache_hit_rate}
    finally:
        stop_sampling.set()
        if sampler is not None:
            await sampler
        for channel in channels:
            await channel.close()
    if server_pid and rss_before is not None:
        report.rss_mib = {"before": rss_before, "peak": max(rss, default=rss_before),
                          "after": rss_mib(server_pid) or float("nan")}
    return report


# ---------------------------------------------------------------------------- a server of its own
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``sluice serve`` on a free loopback port, SERVING; (process, address)."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), *serve_args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"sluice serve not SERVING after 300 s; see {log_path}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> int:
    """SIGTERM (drain), then the exit code; killed after ``timeout_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -signal.SIGKILL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="a running server (default: start one)")
    parser.add_argument("--server-pid", type=int, help="the running server's pid, to sample its memory")
    parser.add_argument("--model", help="the model the started server serves (default: the bundled one)")
    parser.add_argument("--server-arg", action="append", default=[], help="one more flag for sluice serve")
    defaults = LoadSettings()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds")
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument("--min-tokens", type=int, default=defaults.min_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s, help="seconds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = LoadSettings(clients=args.clients, duration_s=args.duration, connections=args.connections,
                            min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                            request_timeout_s=args.request_timeout, seed=args.seed,
                            api_key=os.environ.get("SLUICE_API_KEY"))
    proc, exit_code = None, None
    address, pid = args.address, args.server_pid
    if address is None:
        serve_args = (["--model", args.model] if args.model else []) + args.server_arg
        log_path = Path(tempfile.mkdtemp(prefix="sluice-bench-load-")) / "server.log"
        print(f"server log: {log_path}")
        proc, address = start_server(serve_args, log_path)
        pid = proc.pid
    try:
        report = asyncio.run(run_load(address, settings, pid))
    finally:
        if proc is not None:
            exit_code = stop_server(proc)
    summary = report.summary() | {"server_exit_code": exit_code}
    lat = summary["latency_s"]
    print(f"{summary['requests']} requests in {report.wall_s:.1f} s: {summary['outcomes']}; lost {summary['lost']}, "
          f"hung {summary['hung']}; {summary['output_tokens_per_s']:.1f} tok/s, "
          f"{summary['completed_per_s']:.2f} req/s; TTFT p50 {lat['ttft']['p50']:.3f} s "
          f"p99 {lat['ttft']['p99']:.3f} s; "
          f"e2e p50 {lat['e2e']['p50']:.2f} s p99 {lat['e2e']['p99']:.2f} s; RSS {summary['rss_mib']}; "
          f"idle after {summary['idle_after_s']} s; server exit {exit_code}")
    if args.out:
        write_result(args.out, {"benchmark": "load", "settings": asdict(settings) | {"api_key": None},
                                "results": summary})


if __name__ == "__main__":
    main()
