"""Faults against real ``sluice serve`` processes: clients killed or frozen mid-stream, deadlines
expiring, one request failing inside the server (``SLUICE_FAULT_INJECT``), a burst that exhausts
the KV cache, and an engine crash. Each one must cost only the requests it hits: their KV blocks
come back, the other requests finish with the offline engine's tokens, and a dead engine makes
the process say NOT_SERVING and exit non-zero instead of hanging."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from engine.sampling_params import SamplingParams
from service.client import AsyncSluiceClient, SluiceClient, make_request
from service.faults import FAULT_INJECT_ENV
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc
from tests.service_fixtures import (
    REPO_ROOT,
    SERVICE_MODEL_LEN,
    ServerProcess,
    free_port,
    health_until_exit,
    scrape_metrics,
    start_server,
    wait_for_blocks_freed,
    wait_until_serving,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)
# Long enough that a request still runs when the test acts on it, whatever the machine's speed.
LONG = dict(max_tokens=SERVICE_MODEL_LEN - 64, **GREEDY)
FAIL_GENERATE, FAIL_STREAM, CRASH = "fail-generate", "fail-stream", "crash-now"
# Words of the prompts here, which the server must never write to its log.
PROMPT_WORDS = ("quokka", "zeppelin", "marzipan", "obsidian")
TIGHT_KV_BLOCKS = 40  # 39 usable blocks of 16 tokens: the burst below needs 96


def _prompt(i: int) -> str:
    return f"{PROMPT_WORDS[i % len(PROMPT_WORDS)]} {i}: def f(x):"


def _start(tmp_path_factory: pytest.TempPathFactory, model: Path, name: str, faults: str,
           *args: str) -> tuple[ServerProcess, int]:
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as env:  # the server process inherits the variable
        env.setenv(FAULT_INJECT_ENV, faults)
        srv = start_server(model, tmp_path_factory.mktemp(name), "--metrics-port", str(metrics_port), *args)
    wait_until_serving(srv)
    return srv, metrics_port


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    """Keepalive pings every second, answered within one; two requests fail by injection."""
    srv, metrics_port = _start(tmp_path_factory, service_model, "fault-server",
                               f"fail-request={FAIL_GENERATE},fail-request={FAIL_STREAM}",
                               "--num-kv-blocks", "600", "--keepalive-time-s", "1", "--keepalive-timeout-s", "1")
    try:
        yield srv, metrics_port
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    """Few KV blocks; the request CRASH crashes its engine (the last test here to use it)."""
    srv, metrics_port = _start(tmp_path_factory, service_model, "tight-server", f"crash-engine={CRASH}",
                               "--num-kv-blocks", str(TIGHT_KV_BLOCKS), "--max-model-len", "512")
    try:
        yield srv, metrics_port
    finally:
        srv.stop()


def _aborts(metrics_port: int) -> float:
    return scrape_metrics(metrics_port).get("sluice:request_success_total{finished_reason=abort}", 0)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _num_running(stub: pb_grpc.GenerationStub) -> int:
    return stub.GetLoad(pb.GetLoadRequest(), timeout=10).num_running


def _assert_idle(stub: pb_grpc.GenerationStub) -> None:
    load = wait_for_blocks_freed(stub, timeout=20)
    assert (load.kv_blocks_used, load.num_running, load.num_waiting) == (0, 0, 0)


def _streaming_client(address: str, prompts: list[str], **params) -> subprocess.Popen[str]:
    """A client process streaming one long request per prompt; it prints a line per stream once
    that stream's first tokens arrived."""
    script = textwrap.dedent(f"""
        import threading
        from service.client import SluiceClient

        printing = threading.Lock()  # print writes the line and its newline apart

        def stream(prompt):
            with SluiceClient({address!r}) as client:
                for i, _ in enumerate(client.generate(prompt, **{params!r})):
                    if i == 0:
                        with printing:
                            print("streaming", flush=True)

        threads = [threading.Thread(target=stream, args=(p,)) for p in {prompts!r}]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)


def _expected(oracle, prompts: list[str], max_tokens: int) -> list[list[int]]:
    outputs = oracle.generate(prompts, SamplingParams(max_tokens=max_tokens, **GREEDY))
    return [o.outputs[0].token_ids for o in outputs]


# ------------------------------------------------------------------------------ clients that vanish
def test_killed_clients_are_aborted_and_their_blocks_freed_while_others_stream(fault_server) -> None:
    srv, metrics_port = fault_server
    aborts_before = _aborts(metrics_port)
    clients = [_streaming_client(srv.address, [_prompt(2 * i), _prompt(2 * i + 1)], **LONG) for i in range(3)]
    with SluiceClient(srv.address, timeout=120) as client:
        survivor = client.generate(_prompt(99), **LONG)
        try:
            next(survivor)
            for proc in clients:
                assert [proc.stdout.readline().strip() for _ in range(2)] == ["streaming"] * 2
            assert _num_running(client.stub) == 7
            for proc in clients:
                proc.kill()
                proc.wait(10)
            _wait_for(lambda: _num_running(client.stub) == 1, 20, "the killed clients' requests to end")
            tokens_after_kill = sum(len(next(survivor).token_ids) for _ in range(5))
            assert tokens_after_kill >= 5  # the survivor streams on
        finally:
            survivor.close()
            for proc in clients:
                proc.kill()
        _assert_idle(client.stub)
    assert _aborts(metrics_port) == aborts_before + 7  # six killed and the survivor, cancelled


def test_frozen_client_is_found_by_keepalive_and_its_request_aborted(fault_server) -> None:
    srv, metrics_port = fault_server
    aborts_before = _aborts(metrics_port)
    client = _streaming_client(srv.address, [_prompt(5)], **LONG)
    try:
        assert client.stdout.readline().strip() == "streaming"
        with SluiceClient(srv.address, timeout=30) as observer:
            assert _num_running(observer.stub) == 1
            # Stopped, its socket stays open but nothing answers the server's pings.
            client.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            _wait_for(lambda: _num_running(observer.stub) == 0, 20, "keepalive to drop the frozen client")
            assert time.monotonic() - frozen_at < 15  # keepalive 1 s + 1 s, not the request's length
            _assert_idle(observer.stub)
    finally:
        client.kill()
        client.wait(10)
    assert _aborts(metrics_port) == aborts_before + 1


def test_expiring_deadlines_abort_their_requests_and_spare_the_others(fault_server, oracle) -> None:
    srv, metrics_port = fault_server
    aborts_before = _aborts(metrics_port)
    prompts = [_prompt(i) for i in range(10, 14)]
    expected = _expected(oracle, prompts, 24)

    async def doomed(client: AsyncSluiceClient, i: int) -> grpc.StatusCode:
        try:
            async for _ in client.generate(_prompt(20 + i), timeout=1.0 + 0.2 * i, **LONG):
                pass
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    async def normal(client: AsyncSluiceClient, prompt: str) -> list[int]:
        return [t async for d in client.generate(prompt, timeout=60, max_tokens=24, **GREEDY) for t in d.token_ids]

    async def main():
        async with AsyncSluiceClient(srv.address) as client:
            return await asyncio.gather(asyncio.gather(*(doomed(client, i) for i in range(6))),
                                        asyncio.gather(*(normal(client, p) for p in prompts)))

    codes, outputs = asyncio.run(asyncio.wait_for(main(), 120))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 6
    assert outputs == expected
    with grpc.insecure_channel(srv.address) as channel:
        _assert_idle(pb_grpc.GenerationStub(channel))
    assert _aborts(metrics_port) == aborts_before + 6  # the server ended them, not their max_tokens


# ------------------------------------------------------------------------------ a request that fails
def test_injected_failure_ends_only_that_request(fault_server, oracle) -> None:
    srv, _ = fault_server
    prompts = [_prompt(i) for i in range(30, 34)]
    expected = _expected(oracle, prompts, 16)

    async def generate(client: AsyncSluiceClient, prompt: str, request_id: str):
        request = make_request(prompt, request_id=request_id, max_tokens=16, **GREEDY)
        try:
            return [t async for d in client.generate(request, timeout=60) for t in d.token_ids]
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()

    async def multiplexed(client: AsyncSluiceClient) -> list[pb.GenerateResponse]:
        stream = client.stream(timeout=60)
        for i, prompt in enumerate(prompts):
            stream.submit(make_request(prompt, request_id=f"mux-{i}", max_tokens=16, **GREEDY))
        stream.submit(make_request(_prompt(40), request_id=FAIL_STREAM, max_tokens=16, **GREEDY))
        stream.close()
        return [r async for r in stream]

    async def main():
        async with AsyncSluiceClient(srv.address) as client:
            unary = await asyncio.gather(generate(client, _prompt(41), FAIL_GENERATE),
                                         *(generate(client, p, f"plain-{i}") for i, p in enumerate(prompts)))
            return unary, await multiplexed(client)

    (failed, *outputs), received = asyncio.run(asyncio.wait_for(main(), 120))
    assert failed[0] == grpc.StatusCode.INTERNAL and FAIL_GENERATE in failed[1], failed
    assert outputs == expected
    by_id: dict[str, list[pb.GenerateResponse]] = {}
    for r in received:
        by_id.setdefault(r.request_id, []).append(r)
    final = by_id[FAIL_STREAM][-1]
    assert final.finish_reason == pb.FINISH_REASON_ERROR
    assert final.error.code == grpc.StatusCode.INTERNAL.value[0] and FAIL_STREAM in final.error.message
    for i, want in enumerate(expected):
        deltas = by_id[f"mux-{i}"]
        assert [t for d in deltas for t in d.token_ids] == want
        assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    with grpc.insecure_channel(srv.address) as channel:
        _assert_idle(pb_grpc.GenerationStub(channel))
    log = srv.log()
    assert f"request {FAIL_GENERATE} failed" in log and f"request {FAIL_STREAM} failed" in log
    assert "request_id=plain-0" in log  # request ids are logged ...
    assert not any(word in log for word in PROMPT_WORDS)  # ... prompts and outputs are not


# ------------------------------------------------------------------------------ the KV cache runs out
def test_burst_that_exhausts_the_kv_cache_preempts_and_every_request_finishes(tight_server, oracle) -> None:
    srv, metrics_port = tight_server
    prompts = [_prompt(i) for i in range(50, 66)]  # 16 requests of about 6 blocks each
    expected = _expected(oracle, prompts, 80)
    preemptions_before = scrape_metrics(metrics_port)["sluice:num_preemptions_total"]

    async def main():
        async with AsyncSluiceClient(srv.address, timeout=120) as client:
            async def one(prompt: str) -> tuple[list[int], int]:
                deltas = [d async for d in client.generate(prompt, max_tokens=80, **GREEDY)]
                return [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason
            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(asyncio.wait_for(main(), 180))
    assert [tokens for tokens, _ in results] == expected  # recomputed after preemption, unchanged
    assert {reason for _, reason in results} == {pb.FINISH_REASON_LENGTH}
    time.sleep(1.0)  # the metrics' engine snapshot refreshes every 0.5 s
    assert scrape_metrics(metrics_port)["sluice:num_preemptions_total"] > preemptions_before
    with grpc.insecure_channel(srv.address) as channel:
        _assert_idle(pb_grpc.GenerationStub(channel))


# ------------------------------------------------------------------------------ the engine dies
def test_engine_crash_fails_in_flight_requests_then_not_serving_and_exit_1(tight_server) -> None:
    srv, _ = tight_server
    with SluiceClient(srv.address, timeout=60) as client:
        in_flight = [client.generate(_prompt(70 + i), max_tokens=400, **GREEDY) for i in range(2)]
        for call in in_flight:
            next(call)
        crash = list(client.generate(make_request(_prompt(80), request_id=CRASH, max_tokens=4, **GREEDY)))
        finals = [list(call)[-1] for call in in_flight] + crash[-1:]
    for final in finals:
        assert final.finish_reason == pb.FINISH_REASON_ERROR and "engine failed" in final.error.message
    statuses = health_until_exit(srv, timeout=30)
    assert statuses[0] == "NOT_SERVING", statuses
    assert srv.proc.wait(30) == 1
    assert "engine failed" in srv.log()
