"""End to end through a real ``sluice serve`` process: streamed generation equals the offline
engine, many streams at once, n choices, cancellation and deadlines free the KV cache, the
multiplexed stream, health and reflection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from engine.sampling_params import SamplingParams
from service.client import AsyncSluiceClient, SluiceClient, make_request
from service.servicer import REQUEST_ID_METADATA_KEY
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc
from tests.service_fixtures import (
    MAX_N,
    NUM_KV_BLOCKS,
    REPO_ROOT,
    SERVICE_MODEL_LEN,
    ServerProcess,
    wait_for_blocks_freed,
)

PROMPTS = ["def main(", "import os\n", "The quick brown fox", "class Parser:", "    return self.",
           "héllo wörld", "for i in range(", "# comment"]
# Long enough that a request still runs when the test acts on it, whatever the machine's speed.
LONG = dict(max_tokens=SERVICE_MODEL_LEN - 64, ignore_eos=True, temperature=0.0)


def _run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _text_and_ids(deltas: list[pb.GenerateResponse], index: int = 0) -> tuple[str, list[int]]:
    mine = [d for d in deltas if d.index == index]
    return "".join(d.text for d in mine), [t for d in mine for t in d.token_ids]


FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def test_streamed_text_equals_offline_engine(server: ServerProcess, oracle) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = oracle.generate(PROMPTS[:4], params)
    with SluiceClient(server.address, timeout=60) as client:
        for prompt, want in zip(PROMPTS[:4], expected, strict=True):
            deltas = list(client.generate(prompt, temperature=0.0, max_tokens=16))
            text, ids = _text_and_ids(deltas)
            out = want.outputs[0]
            assert (text, ids) == (out.text, out.token_ids)
            final = deltas[-1]
            assert all(d.finish_reason == pb.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
            assert final.finish_reason == FINISH[out.finish_reason]
            assert final.usage.prompt_tokens == len(want.prompt_token_ids)
            assert final.usage.completion_tokens == len(out.token_ids)
            u = final.usage
            assert 0 <= u.queue_wait_seconds <= u.time_to_first_token_seconds <= u.total_seconds


def test_token_id_prompt_and_stop_string(server: ServerProcess, oracle) -> None:
    prompt_ids = oracle.get_tokenizer().encode(PROMPTS[0])
    full = oracle.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    stop = full.text[5:8]
    expected = oracle.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))[0]
    with SluiceClient(server.address, timeout=60) as client:
        deltas = list(client.generate(prompt_ids, temperature=0.0, max_tokens=24, stop=[stop]))
    assert _text_and_ids(deltas) == (expected.outputs[0].text, expected.outputs[0].token_ids)
    assert deltas[-1].finish_reason == pb.FINISH_REASON_STOP
    assert deltas[-1].stop_string == stop


def test_logprobs_match_offline_engine(server: ServerProcess, oracle) -> None:
    expected = oracle.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))[0]
    with SluiceClient(server.address, timeout=60) as client:
        deltas = list(client.generate(PROMPTS[1], temperature=0.0, max_tokens=6, logprobs=3))
    entries = [e for d in deltas for e in d.logprobs]
    out = expected.outputs[0]
    assert [e.token_id for e in entries] == out.token_ids
    for entry, want, tid in zip(entries, out.logprobs, out.token_ids, strict=True):
        assert entry.logprob == pytest.approx(want[tid].logprob, abs=1e-5)
        top = sorted(want.items(), key=lambda kv: -kv[1].logprob)[:3]
        assert [t.token_id for t in entry.top_logprobs] == [tid_ for tid_, _ in top]


def test_32_concurrent_streams_all_finish_correctly(server: ServerProcess, oracle) -> None:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(32)]
    # Long enough that the client's own lag in reading 32 streams' first messages (tens of ms on
    # a loaded 2-core machine) stays inside the time they run together.
    params = dict(temperature=0.0, max_tokens=32, ignore_eos=True)
    expected = oracle.generate(prompts, SamplingParams(**params))

    async def one(client: AsyncSluiceClient, prompt: str) -> tuple[list[pb.GenerateResponse], float, float]:
        deltas, first = [], None
        async for delta in client.generate(prompt, **params):
            first = first or time.monotonic()
            deltas.append(delta)
        return deltas, first, time.monotonic()

    async def main():
        async with AsyncSluiceClient(server.address, timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = _run(main())
    for (deltas, _, _), want in zip(results, expected, strict=True):
        text, ids = _text_and_ids(deltas)
        assert ids == want.outputs[0].token_ids
        assert text == want.outputs[0].text
        assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # They ran together: every stream had its first token before any stream ended.
    assert max(first for _, first, _ in results) < min(end for _, _, end in results)


def test_n_3_returns_three_indexed_choices(server: ServerProcess, oracle) -> None:
    params = dict(temperature=1.0, seed=1234, n=3, max_tokens=12)
    expected = oracle.generate(PROMPTS[2], SamplingParams(**params))[0]
    with SluiceClient(server.address, timeout=60) as client:
        deltas = list(client.generate(PROMPTS[2], **params))
    assert {d.index for d in deltas} == {0, 1, 2}
    for i in range(3):
        assert _text_and_ids(deltas, i) == (expected.outputs[i].text, expected.outputs[i].token_ids)
        finals = [d for d in deltas if d.index == i and d.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
        assert len(finals) == 1 and finals[0] is [d for d in deltas if d.index == i][-1]
        assert finals[0].usage.completion_tokens == len(expected.outputs[i].token_ids)


def _assert_freed(stub: pb_grpc.GenerationStub) -> None:
    load = wait_for_blocks_freed(stub)
    assert (load.kv_blocks_used, load.num_running, load.num_waiting) == (0, 0, 0)
    assert load.kv_blocks_total == NUM_KV_BLOCKS - 1  # block 0 is the block manager's null block


def _running_load(stub: pb_grpc.GenerationStub) -> pb.Load:
    load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
    assert load.num_running == 1 and load.kv_blocks_used > 0
    return load


def test_cancel_mid_stream_frees_blocks(server: ServerProcess) -> None:
    with SluiceClient(server.address, timeout=120) as client:
        _assert_freed(client.stub)
        deltas = client.generate(PROMPTS[0], **LONG)
        for _, _ in zip(range(3), deltas, strict=False):
            pass
        _running_load(client.stub)
        deltas.close()  # leaving the client's stream cancels the call
        _assert_freed(client.stub)


def test_deadline_aborts_and_frees_blocks(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        call = stub.Generate(make_request(PROMPTS[1], **LONG), timeout=2.0)
        next(call)
        _running_load(stub)
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _assert_freed(stub)


def test_killed_client_frees_blocks(server: ServerProcess) -> None:
    script = textwrap.dedent(f"""
        from service.client import SluiceClient
        with SluiceClient({server.address!r}) as client:
            for delta in client.generate({PROMPTS[2]!r}, **{LONG!r}):
                print("streaming", flush=True)
    """)
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert client.stdout.readline().strip() == "streaming"
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            _running_load(stub)
            client.kill()
            client.wait(10)
            _assert_freed(stub)
    finally:
        client.kill()


def test_bidirectional_stream_interleaves_16_requests_and_cancels_one(server: ServerProcess, oracle) -> None:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(16)]
    params = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = oracle.generate(prompts, SamplingParams(**params))
    victim = "req-5"

    async def main() -> list[pb.GenerateResponse]:
        async with AsyncSluiceClient(server.address, timeout=120) as client:
            stream = client.stream()
            for i, prompt in enumerate(prompts):
                stream.submit(make_request(prompt, request_id=f"req-{i}", **(LONG if i == 5 else params)))
            received = []
            async for response in stream:
                if response.request_id == victim and all(r.request_id != victim for r in received):
                    stream.cancel(victim)
                    stream.close()  # no more requests; the server ends the stream when all are done
                received.append(response)
            return received

    received = _run(main())
    by_id: dict[str, list[pb.GenerateResponse]] = {}
    for r in received:
        by_id.setdefault(r.request_id, []).append(r)
    assert set(by_id) == {f"req-{i}" for i in range(16)}
    for i, want in enumerate(expected):
        if i != 5:
            deltas = by_id[f"req-{i}"]
            assert _text_and_ids(deltas) == (want.outputs[0].text, want.outputs[0].token_ids)
            assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    cancelled = by_id[victim]
    assert cancelled[-1].finish_reason == pb.FINISH_REASON_ABORTED
    assert cancelled[-1].usage.completion_tokens < LONG["max_tokens"]
    switches = sum(a.request_id != b.request_id for a, b in zip(received, received[1:], strict=False))
    assert switches > 16, "responses were not interleaved"
    with grpc.insecure_channel(server.address) as channel:
        _assert_freed(pb_grpc.GenerationStub(channel))


def test_bidirectional_stream_reports_a_bad_request_without_closing(server: ServerProcess) -> None:
    async def main() -> list[pb.GenerateResponse]:
        async with AsyncSluiceClient(server.address, timeout=60) as client:
            stream = client.stream()
            stream.submit(make_request("ok", request_id="good", temperature=0.0, max_tokens=4))
            stream.submit(make_request("bad", request_id="bad", temperature=-1.0))
            stream.close()
            return [r async for r in stream]

    received = _run(main())
    bad = [r for r in received if r.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == pb.FINISH_REASON_ERROR
    assert bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "temperature" in bad[0].error.message
    assert [r for r in received if r.request_id == "good"][-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_abort_rpc_ends_the_stream_aborted(server: ServerProcess) -> None:
    with SluiceClient(server.address, timeout=60) as client:
        request = make_request(PROMPTS[3], **LONG)
        call = client.stub.Generate(request, timeout=60)
        assert dict(call.initial_metadata())[REQUEST_ID_METADATA_KEY] == request.request_id
        next(call)
        assert client.cancel(request.request_id, "no-such-request") == [request.request_id]
        final = list(call)[-1]
        assert final.finish_reason == pb.FINISH_REASON_ABORTED
        assert client.cancel("no-such-request") == []
        _assert_freed(client.stub)


def test_unary_calls_describe_the_model(server: ServerProcess, oracle) -> None:
    tokenizer = oracle.get_tokenizer()
    with SluiceClient(server.address, timeout=30) as client:
        ids = client.tokenize(PROMPTS[5])
        assert ids == tokenizer.encode(PROMPTS[5])
        assert client.detokenize(ids) == tokenizer.decode(ids)
        info = client.model_info()
        config = oracle.engine.model_config
        assert (info.architecture, info.vocab_size, info.max_model_len) == (
            "LlamaForCausalLM", oracle.engine.vocab_size, SERVICE_MODEL_LEN)
        assert (info.dtype, info.quantization, info.attention_backend) == ("float32", "", "torch")
        assert (info.block_size, info.num_kv_blocks, info.max_n) == (16, NUM_KV_BLOCKS, MAX_N)
        assert info.name == config.name and info.sluice_version
        with pytest.raises(grpc.RpcError) as err:
            client.detokenize([oracle.engine.vocab_size])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in err.value.details()
        list(client.generate("x", max_tokens=20, ignore_eos=True))
        # The engine averages generated tokens over its recent window (10 s).
        assert client.load().tokens_per_second >= 20 / 10


def test_health_and_reflection_list_both_services(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with SluiceClient(server.address, timeout=30) as client:
        assert client.health() == "SERVING"
        assert client.health("sluice.v1.Generation") == "SERVING"
        database = ProtoReflectionDescriptorDatabase(client.channel)
        services = set(database.get_services())
        assert {"sluice.v1.Generation", "grpc.health.v1.Health"} <= services
        # The full schema comes through reflection, so tools need no .proto files.
        generate = database.FindFileContainingSymbol("sluice.v1.Generation")
        assert "GenerateRequest" in [m.name for m in generate.message_type]
