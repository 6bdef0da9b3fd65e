"""Real ``sluice serve`` subprocesses on free loopback ports, for the service and CLI tests.

tests/conftest.py loads this module as a plugin, so its session fixtures (one server process
for the whole session) are shared by every test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import SluiceClient
from tests.tiny_models import build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
# The service model has a long context (4096) so that one request can outlive any test's wait.
SERVICE_MODEL_LEN = 4096
NUM_KV_BLOCKS = 600
MAX_N = 8
MAIN_SERVER_ARGS = ("--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "64", "--max-n", str(MAX_N))
# Short reconnect backoff: a test polling a server that is starting should see it within ms.
FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                  ("grpc.max_reconnect_backoff_ms", 200))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    # Health statuses seen while waiting for SERVING, in order, without repeats.
    startup_statuses: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(model_dir: Path, log_dir: Path, *extra_args: str) -> ServerProcess:
    """Start ``sluice serve`` and return at once (see ``wait_until_serving``)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    # The tests and the server share two cores: one intra-op thread keeps the server's OpenMP pool
    # from spinning against the test process's (the tiny model gains nothing from more).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, f"127.0.0.1:{port}", log_path)


def wait_until_serving(server: ServerProcess, timeout: float = START_TIMEOUT_S,
                       on_not_serving: Callable[[grpc.Channel], None] | None = None) -> None:
    """Poll health until SERVING, recording each status seen (UNREACHABLE before the bind).
    ``on_not_serving(channel)`` runs once, as soon as the server first answers NOT_SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.address, options=FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server not SERVING after {timeout} s:\n{server.log()}")
            try:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status)
            except grpc.RpcError:
                status = "UNREACHABLE"
            if not server.startup_statuses or server.startup_statuses[-1] != status:
                server.startup_statuses.append(status)
                if status == "NOT_SERVING" and on_not_serving is not None:
                    on_not_serving(channel)
            if status == "SERVING":
                return
            time.sleep(0.02)


@pytest.fixture(scope="session")
def service_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The tiny Llama the service tests serve."""
    return build_model(tmp_path_factory.mktemp("service-model"), "llama", tokenizer_dir,
                       max_position_embeddings=SERVICE_MODEL_LEN)


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           service_model: Path) -> ServerProcess:
    """The session's main server (MAIN_SERVER_ARGS), SERVING."""
    srv = start_server(service_model, tmp_path_factory.getbasetemp() / "server-logs", *MAIN_SERVER_ARGS)
    request.addfinalizer(srv.stop)
    wait_until_serving(srv)
    return srv


@pytest.fixture(scope="session")
def oracle(service_model: Path):
    """The offline engine on the served model with the server's engine settings."""
    from engine.llm import LLM

    return LLM(model=str(service_model), num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=64)


def wait_for_blocks_freed(stub, timeout: float = 10.0):
    """Poll GetLoad until no request runs or waits and every KV block is free; the last Load."""
    from sluice.v1 import generation_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=5.0)
        if load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0:
            return load
        if time.monotonic() > deadline:
            return load
        time.sleep(0.02)


def wait_until_serving_through(srv: ServerProcess, client: SluiceClient) -> None:
    """Poll health through ``client`` (TLS, client certificates: whatever it carries) until SERVING."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not SERVING after {START_TIMEOUT_S} s:\n{srv.log()}")
        try:
            if client.health() == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)


def scrape_metrics(port: int) -> dict[str, float]:
    """Every sample a server's /metrics shows, keyed by name plus its labels (histogram buckets left out)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" in s.labels:
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def health_until_exit(server: ServerProcess, timeout: float) -> list[str]:
    """Poll health every 20 ms until the process exits (or ``timeout``); the statuses seen, in
    order, without repeats (UNREACHABLE when no answer)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.address, options=FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status)
            except grpc.RpcError:
                status = "UNREACHABLE"
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.02)
    return seen
