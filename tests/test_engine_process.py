"""The engine in a process of its own (the server's default, ``--engine-process``): real servers,
real signals. A killed engine process fails the requests in flight and takes the server down
with exit code 1 (an orchestrator restarts it); a killed server leaves no engine behind. The
outputs' pipe format round-trips every field; ``--no-engine-process`` serves the same tokens."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from service.client import SluiceClient
from service.engine_core import pack_outputs, unpack_outputs
from sluice.v1 import generation_pb2 as pb
from tests.service_fixtures import health_until_exit, start_server, wait_until_serving

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n"]


def _engine_pid(log: str) -> int:
    found = re.search(r"engine process (\d+): model loaded", log)
    assert found, log
    return int(found.group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_outputs_survive_the_pipe_format() -> None:
    metrics = RequestMetrics(1.0, 2.0, 3.0, None)
    outputs = [
        RequestOutput("a", "prompt text", [5, 6], [
            CompletionOutput(0, "x", [7], -0.5, [{7: Logprob(-0.5, 1, "x")}], None, None, 4, 3),
            CompletionOutput(1, "", [], None, None, "stop", 2, 0, 0)], False, 16, metrics),
        RequestOutput("b", None, [1], [CompletionOutput(0, "", [], finish_reason="error")], True, error="boom"),
    ]
    back = unpack_outputs(pack_outputs(outputs))
    for got, sent in zip(back, outputs, strict=True):
        # The prompt stays in the server's process, which fills it back in from the request.
        assert (got.prompt, got.prompt_token_ids) == (None, [])
        got.prompt, got.prompt_token_ids = sent.prompt, sent.prompt_token_ids
        assert got == sent


@pytest.fixture
def fresh_server(tmp_path: Path, service_model: Path):
    srv = start_server(service_model, tmp_path, "--num-kv-blocks", "600")
    try:
        wait_until_serving(srv)
        yield srv
    finally:
        srv.stop()


def test_killed_engine_process_fails_requests_in_flight_then_exit_1(fresh_server) -> None:
    srv = fresh_server
    pid = _engine_pid(srv.log())
    assert pid != srv.proc.pid
    with SluiceClient(srv.address, timeout=60) as client:
        call = client.generate("def f(x):", max_tokens=400, **GREEDY)
        next(call)
        os.kill(pid, signal.SIGKILL)
        final = list(call)[-1]
    assert final.finish_reason == pb.FINISH_REASON_ERROR
    assert "engine process exited with code -9" in final.error.message, final.error.message
    statuses = health_until_exit(srv, timeout=30)
    assert statuses[0] == "NOT_SERVING", statuses
    assert srv.proc.wait(30) == 1


def test_killed_server_leaves_no_engine_process(fresh_server) -> None:
    """SIGKILL to the server mid-generation: its engine process, busy stepping, exits too."""
    srv = fresh_server
    pid = _engine_pid(srv.log())
    with SluiceClient(srv.address, timeout=60) as client:
        call = client.generate("def f(x):", max_tokens=400, **GREEDY)
        next(call)
        srv.proc.kill()
        srv.proc.wait(10)
        with pytest.raises(grpc.RpcError):
            list(call)
    assert _wait_gone(pid, timeout=30), "the engine process outlived its server"


def test_engine_thread_serves_the_same_tokens(tmp_path: Path, service_model: Path, server) -> None:
    """``--no-engine-process`` runs the engine on a thread of the server's process."""
    srv = start_server(service_model, tmp_path, "--num-kv-blocks", "600", "--no-engine-process")
    try:
        wait_until_serving(srv)
        assert "engine process" not in srv.log()
        with SluiceClient(srv.address, timeout=60) as thread_client, SluiceClient(server.address, timeout=60) as proc:
            for prompt in PROMPTS:
                ours = [t for d in thread_client.generate(prompt, max_tokens=12, **GREEDY) for t in d.token_ids]
                theirs = [t for d in proc.generate(prompt, max_tokens=12, **GREEDY) for t in d.token_ids]
                assert ours == theirs and len(ours) == 12
    finally:
        assert srv.stop() == 0
