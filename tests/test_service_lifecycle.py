"""A server's life through a real ``sluice serve`` process with a one-slot batch and a one-slot
waiting queue: SERVING only after warm-up, RESOURCE_EXHAUSTED when the queue is full, and
SIGTERM draining active streams before exiting 0."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import make_request
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc
from tests.service_fixtures import ServerProcess, start_server, wait_for_blocks_freed, wait_until_serving

LONG = dict(max_tokens=3000, ignore_eos=True, temperature=0.0)


@dataclass
class StartedServer:
    process: ServerProcess
    # Status codes of the Generate calls sent while health said NOT_SERVING.
    codes_while_loading: list[grpc.StatusCode] = field(default_factory=list)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    """A server that runs one request at a time and queues one more."""
    started = StartedServer(start_server(
        service_model, tmp_path_factory.mktemp("small-server"), "--num-kv-blocks", "600",
        "--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", "60"))

    def generate_while_loading(channel: grpc.Channel) -> None:
        try:
            list(pb_grpc.GenerationStub(channel).Generate(make_request("hi", max_tokens=2), timeout=10))
            started.codes_while_loading.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            started.codes_while_loading.append(err.code())

    try:
        wait_until_serving(started.process, on_not_serving=generate_while_loading)
        yield started
    finally:
        started.process.stop()


@pytest.fixture
def stub(small_server: StartedServer):
    with grpc.insecure_channel(small_server.process.address) as channel:
        yield pb_grpc.GenerationStub(channel)


def test_health_is_serving_only_after_warm_up(small_server: StartedServer) -> None:
    statuses = small_server.process.startup_statuses
    assert statuses[-1] == "SERVING" and statuses.count("SERVING") == 1
    assert "NOT_SERVING" in statuses, statuses
    assert small_server.codes_while_loading == [grpc.StatusCode.UNAVAILABLE]
    log = small_server.process.log()
    assert log.index("listening on") < log.index("warm-up done") < log.index("serving sluice.v1.Generation")


def test_full_queue_is_resource_exhausted(stub) -> None:
    running = stub.Generate(make_request("a", **LONG), timeout=60)
    next(running)  # it holds the only batch slot
    waiting = stub.Generate(make_request("b", **LONG), timeout=60)
    waiting.initial_metadata()  # sent on acceptance: it holds the only queue slot
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(make_request("c", max_tokens=2), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in err.value.details()
    finally:
        running.cancel()
        waiting.cancel()
    load = wait_for_blocks_freed(stub)
    assert (load.kv_blocks_used, load.num_running, load.num_waiting) == (0, 0, 0)


def test_sigterm_finishes_active_streams_then_exits_0(small_server: StartedServer, stub) -> None:
    server = small_server.process
    params = dict(max_tokens=40, ignore_eos=True, temperature=0.0)
    running = stub.Generate(make_request("a", **params), timeout=120)
    first = next(running)
    waiting = stub.Generate(make_request("b", **params), timeout=120)
    waiting.initial_metadata()
    server.proc.send_signal(signal.SIGTERM)

    with grpc.insecure_channel(server.address) as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status != not_serving:
            assert time.monotonic() < deadline, "health never went NOT_SERVING after SIGTERM"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.GenerationStub(channel).Generate(make_request("late", max_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    for call, head in ((running, [first]), (waiting, [])):
        deltas = head + list(call)
        assert sum(len(d.token_ids) for d in deltas) == 40
        assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.proc.wait(60) == 0
    assert "draining" in server.log()
