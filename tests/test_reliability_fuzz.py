"""Hostile input through a real ``sluice serve`` process with small limits: property-based fuzzing
of every ``GenerateRequest`` field and of raw request bytes, and the limits themselves (message
size, prompt tokens, request ids, concurrent streams per connection).

The oracle is the API contract written in protos/sluice/v1/generation.proto: for each request,
``problems`` lists the fields the contract forbids as given. A request with none must be
accepted; one with some must get INVALID_ARGUMENT whose message starts with one of them; one
larger than the message limit must get RESOURCE_EXHAUSTED. Throughout, another client keeps
sending a well-formed request and must keep getting the same greedy tokens.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.tokenizer import Tokenizer
from service.cli import build_parser, flags_of
from service.client import SluiceClient, make_request
from service.server import ServerArgs, grpc_options
from service.servicer import REQUEST_ID_METADATA_KEY
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc
from tests.service_fixtures import ServerProcess, start_server, wait_for_blocks_freed, wait_until_serving

MAX_MODEL_LEN = 256
MAX_PROMPT_TOKENS = 64
MAX_MESSAGE_BYTES = 64 * 1024
MAX_N = 4
MAX_LOGPROBS = 20  # the engine's default --max-logprobs
MAX_CONCURRENT_STREAMS = 4
DEFAULT_MAX_TOKENS = 16  # the proto's default
MAX_REQUEST_ID_CHARS = 256
FIELDS = pb.GenerateRequest.DESCRIPTOR.fields_by_name
FUZZ_EXAMPLES = 150
RAW_EXAMPLES = 100
GENERATE_METHOD = "/sluice.v1.Generation/Generate"
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.large_base_example])


@dataclass
class FuzzRun:
    """What the fuzz server and its well-formed neighbour went through."""

    server: ServerProcess
    tokenizer: Tokenizer
    vocab_size: int
    outcomes: Counter[str] = field(default_factory=Counter)
    accepted_ids: set[str] = field(default_factory=set)  # ids of requests the server took
    neighbour_ok: int = 0
    neighbour_failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    srv = start_server(service_model, tmp_path_factory.mktemp("fuzz-server"), "--num-kv-blocks", "64",
                       "--max-model-len", str(MAX_MODEL_LEN), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
                       "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-n", str(MAX_N),
                       "--max-concurrent-streams", str(MAX_CONCURRENT_STREAMS))
    try:
        wait_until_serving(srv)
        with SluiceClient(srv.address, timeout=30) as client:
            vocab_size = client.model_info().vocab_size
        run = FuzzRun(srv, Tokenizer.from_pretrained(service_model), vocab_size)
        stop = threading.Event()
        neighbour = threading.Thread(target=_well_formed_neighbour, args=(run, stop))
        neighbour.start()
        try:
            yield run
        finally:
            stop.set()
            neighbour.join(60)
        print(f"\nfuzz cases tried: {sum(run.outcomes.values())} ({dict(run.outcomes)}); "
              f"well-formed neighbour requests served meanwhile: {run.neighbour_ok}")
    finally:
        srv.stop()


def _well_formed_neighbour(run: FuzzRun, stop: threading.Event) -> None:
    """Send one well-formed greedy request after another; each must give the first one's tokens."""
    expected = None
    with SluiceClient(run.server.address, timeout=30) as client:
        while not stop.is_set():
            try:
                tokens = [t for d in client.generate("def neighbour(x):", temperature=0.0, max_tokens=8,
                                                     ignore_eos=True) for t in d.token_ids]
            except grpc.RpcError as err:
                run.neighbour_failures.append(f"{err.code().name}: {err.details()}")
            else:
                expected = expected or tokens
                if tokens != expected:
                    run.neighbour_failures.append(f"tokens {tokens} != {expected}")
                run.neighbour_ok += 1
            time.sleep(0.05)


# ------------------------------------------------------------------------------ the contract
def problems(request: pb.GenerateRequest, tokenizer: Tokenizer, vocab_size: int) -> set[str]:
    """The fields whose values the API contract forbids, as given (empty: a valid request)."""
    bad: set[str] = set()
    rid = request.request_id
    if rid and (len(rid) > MAX_REQUEST_ID_CHARS or not all("!" <= c <= "~" for c in rid)):
        bad.add("request_id")
    prompt_len = None
    if request.HasField("text") == bool(request.token_ids):  # both or neither
        bad |= {"text", "token_ids"}
    elif request.HasField("text"):
        prompt_len = len(tokenizer.encode(request.text)) if request.text else 0
        if not 0 < prompt_len <= MAX_PROMPT_TOKENS:
            bad.add("text")
    else:
        prompt_len = len(request.token_ids)
        if prompt_len > MAX_PROMPT_TOKENS or max(request.token_ids) >= vocab_size:
            bad.add("token_ids")

    def has(name: str) -> bool:
        return request.HasField(name)

    def finite_in(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
        if has(name):
            v = getattr(request, name)
            if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
                bad.add(name)

    finite_in("temperature", 0.0, math.inf)
    finite_in("top_p", 0.0, 1.0, lo_open=True)
    finite_in("min_p", 0.0, 1.0)
    finite_in("presence_penalty", -2.0, 2.0)
    finite_in("frequency_penalty", -2.0, 2.0)
    finite_in("repetition_penalty", 0.0, math.inf, lo_open=True)
    if has("top_k") and request.top_k < -1:
        bad.add("top_k")
    if any(t >= vocab_size or not math.isfinite(b) or abs(b) > 100 for t, b in request.logit_bias.items()):
        bad.add("logit_bias")
    max_tokens = request.max_tokens if has("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        bad.add("max_tokens")
    if prompt_len is not None and prompt_len >= MAX_MODEL_LEN:
        bad.add("text" if request.HasField("text") else "token_ids")
    elif prompt_len is not None and prompt_len + max_tokens > MAX_MODEL_LEN:
        bad.add("max_tokens")
    if has("min_tokens") and request.min_tokens > max_tokens:
        bad.add("min_tokens")
    if any(not s for s in request.stop) or (request.stop and has("detokenize") and not request.detokenize):
        bad.add("stop")
    if any(t >= vocab_size for t in request.stop_token_ids):
        bad.add("stop_token_ids")
    if has("logprobs") and request.logprobs > MAX_LOGPROBS:
        bad.add("logprobs")
    if has("n") and not 1 <= request.n <= MAX_N:
        bad.add("n")
    return bad


def _named_field(message: str) -> str:
    """The field an INVALID_ARGUMENT message starts with."""
    match = re.match(r"[a-z_]+", message)
    return match.group(0) if match else ""


def check_outcome(run: FuzzRun, data: bytes) -> None:
    """Send serialized request bytes as a Generate call and check the answer against the contract."""
    try:
        request = pb.GenerateRequest.FromString(data)
        expected = problems(request, run.tokenizer, run.vocab_size)
    except DecodeError:
        request, expected = None, {"malformed"}
    with grpc.insecure_channel(run.server.address) as channel:
        call = channel.unary_stream(GENERATE_METHOD)(data, timeout=30)
        try:
            responses = []
            for response in call:
                responses.append(pb.GenerateResponse.FromString(response))
                if len(responses) == 3:  # a few engine steps with these parameters are enough
                    break
            call.cancel()
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
    run.outcomes[code.name] += 1
    context = f"request {request!r:.600} expected problems {expected} got {code.name}: {details!r:.300}"
    if len(data) > MAX_MESSAGE_BYTES:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, context
    elif expected == {"malformed"}:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in details, context
    elif expected:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, context
        assert _named_field(details) in expected, context
    elif code == grpc.StatusCode.ALREADY_EXISTS:
        # An earlier example's request with this id was cancelled and is still being aborted.
        assert request.request_id in run.accepted_ids and details.startswith("request_id "), context
    else:
        assert code == grpc.StatusCode.OK, context
        run.accepted_ids.add(request.request_id)
        assert responses and all(r.finish_reason in (pb.FINISH_REASON_UNSPECIFIED, pb.FINISH_REASON_STOP,
                                                     pb.FINISH_REASON_LENGTH) for r in responses), context


# ------------------------------------------------------------------------------ strategies
SPECIAL_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e300, -1e300, math.nan, math.inf, -math.inf, 1.0, 2.0, -2.0,
                  0.5, 100.0, -100.0, 100.00000000000001]
HUGE_TEXT = "x" * (MAX_MESSAGE_BYTES + 10)  # over the message limit on its own
LONG_TEXT = "def f(x):\n    return x\n" * 40  # under the message limit, over the prompt limit
SPECIAL_TEXTS = ["", " ", "\x00", "\u202e", "\U0010ffff", "é" * 300, "a b" * 200, "<|bos|>", "<|eos|>" * 3,
                 LONG_TEXT, HUGE_TEXT]


def _hostile(fd: FieldDescriptor) -> st.SearchStrategy:
    """Any value the field's proto type can carry, weighted towards edges."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key), _scalar(value), max_size=6)
    if fd.is_repeated:
        return st.lists(_scalar(fd), max_size=8) | st.lists(_scalar(fd), min_size=60, max_size=80)
    return _scalar(fd)


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy:
    t = fd.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from(SPECIAL_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.sampled_from(SPECIAL_TEXTS) | st.text(max_size=40)
    bits = 64 if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                       FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64) else 32
    unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                     FieldDescriptor.TYPE_FIXED64)
    lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.sampled_from([lo, hi, 0, 1]) | st.integers(max(lo, -3), 600) | st.integers(lo, hi)


# Values the contract allows (alone): most requests get past validation into the engine.
VALID = {
    "request_id": st.from_regex(r"[!-~]{1,40}", fullmatch=True),
    "temperature": st.sampled_from([0.0, 0.5, 1.0, 1e-7]) | st.floats(0, 5),
    "top_p": st.floats(1e-9, 1.0),
    "top_k": st.integers(-1, 600),
    "min_p": st.floats(0.0, 1.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(1e-3, 10.0),
    "logit_bias": st.dictionaries(st.integers(0, 511), st.floats(-100, 100), max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "max_tokens": st.integers(1, 40),
    "min_tokens": st.integers(0, 4),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "logprobs": st.integers(0, MAX_LOGPROBS),
    "n": st.integers(1, MAX_N),
    "priority": st.integers(-5, 5),
    "cache_salt": st.text(max_size=10),
}
PROMPTS = (st.text(min_size=1, max_size=60).map(lambda text: {"text": text})
           | st.lists(st.integers(0, 511), min_size=1, max_size=40).map(lambda ids: {"token_ids": ids}))


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A prompt and valid values for some fields, then up to three fields (any, including the
    prompt's) set to anything their type can carry."""
    fields = dict(draw(PROMPTS))
    for name, strategy in VALID.items():
        if name in FIELDS and draw(st.booleans()):
            fields[name] = draw(strategy)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        fields[name] = draw(_hostile(FIELDS[name]))
        if name in ("text", "token_ids") and draw(st.booleans()):
            fields.pop("token_ids" if name == "text" else "text", None)
    return pb.GenerateRequest(**fields)


# Wire-level fields: any number, any wire type (so: wrong types), any bytes (so: invalid UTF-8).
_WIRE_FIELDS = st.tuples(st.integers(1, 30), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=24),
                         st.integers(0, 2**64 - 1))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _wire(fields: list[tuple[int, int, bytes, int]]) -> bytes:
    out = bytearray()
    for number, wire_type, payload, integer in fields:
        out += _varint(number << 3 | wire_type)
        if wire_type == 0:
            out += _varint(integer)
        elif wire_type == 1:
            out += integer.to_bytes(8, "little")
        elif wire_type == 5:
            out += (integer & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            out += _varint(len(payload)) + payload
    return bytes(out)


RAW_REQUESTS = (st.lists(_WIRE_FIELDS, max_size=6).map(_wire)
                | st.binary(max_size=64)
                | generate_requests().map(lambda r: r.SerializeToString()).flatmap(
                    lambda data: st.tuples(st.just(data), st.integers(0, max(len(data) - 1, 0)), st.binary(
                        min_size=1, max_size=3)).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])))


# ------------------------------------------------------------------------------ fuzzing
@FUZZ_SETTINGS
@given(request=generate_requests())
@example(request=pb.GenerateRequest(text=HUGE_TEXT))
@example(request=pb.GenerateRequest(text="hi", temperature=math.nan, top_p=math.inf))
@example(request=pb.GenerateRequest(token_ids=[5], logit_bias={3: -math.inf}))
@example(request=pb.GenerateRequest(text="hi", stop=[""], detokenize=False))
@example(request=pb.GenerateRequest(token_ids=[2**32 - 1], n=2**32 - 1, max_tokens=0))
@example(request=pb.GenerateRequest(text="hi", seed=-(2**63), n=MAX_N, logprobs=MAX_LOGPROBS, top_k=2**31 - 1))
def test_fuzzed_requests_get_the_status_the_contract_gives(fuzz: FuzzRun, request: pb.GenerateRequest) -> None:
    check_outcome(fuzz, request.SerializeToString())


@settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
@given(data=RAW_REQUESTS)
def test_fuzzed_request_bytes_wrong_types_and_invalid_utf8(fuzz: FuzzRun, data: bytes) -> None:
    check_outcome(fuzz, data)


def test_server_kept_serving_through_the_fuzzing(fuzz: FuzzRun) -> None:
    """Runs after the fuzzing (file order): the server is alive and idle, the neighbour was served."""
    assert fuzz.server.proc.poll() is None
    assert sum(fuzz.outcomes.values()) >= FUZZ_EXAMPLES
    assert fuzz.outcomes["OK"] > 20 and fuzz.outcomes["INVALID_ARGUMENT"] > 20, fuzz.outcomes
    assert fuzz.outcomes["RESOURCE_EXHAUSTED"] > 0, fuzz.outcomes
    with SluiceClient(fuzz.server.address, timeout=30) as client:
        assert client.health() == "SERVING"
        load = wait_for_blocks_freed(client.stub, timeout=20)
    assert (load.num_running, load.num_waiting, load.kv_blocks_used) == (0, 0, 0)
    assert fuzz.neighbour_failures == []
    assert fuzz.neighbour_ok >= 5
    log = fuzz.server.log()
    assert "Traceback" not in log and "ERROR" not in log
    assert "PLAINTEXT" not in log  # loopback: no warning


# ------------------------------------------------------------------------------ the limits, one by one
def test_message_size_limit_is_resource_exhausted_just_above_it(fuzz: FuzzRun) -> None:
    def request_of_size(size: int) -> pb.GenerateRequest:
        request = pb.GenerateRequest(text="y" * (size - 4))  # 1-byte tag, 3-byte length
        assert request.ByteSize() == size
        return request

    with SluiceClient(fuzz.server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as at_limit:
            list(client.generate(request_of_size(MAX_MESSAGE_BYTES)))
        with pytest.raises(grpc.RpcError) as over:
            list(client.generate(request_of_size(MAX_MESSAGE_BYTES + 1)))
    # At the limit the message is read, and the prompt is refused for its length.
    assert at_limit.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(r"text: .*\b\d+ tokens\b", at_limit.value.details()), at_limit.value.details()
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_prompt_token_limit_names_the_field_and_the_flag(fuzz: FuzzRun) -> None:
    with SluiceClient(fuzz.server.address, timeout=30) as client:
        at_limit = list(client.generate([5] * MAX_PROMPT_TOKENS, max_tokens=2, temperature=0.0))
        assert at_limit[-1].usage.prompt_tokens == MAX_PROMPT_TOKENS
        text = "alpha beta gamma " * 10
        assert MAX_PROMPT_TOKENS < len(client.tokenize(text)) < MAX_MODEL_LEN // 2  # only this limit binds
        for prompt, name in (([5] * (MAX_PROMPT_TOKENS + 1), "token_ids"), (text, "text")):
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate(prompt, max_tokens=2))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"{name}: ") and "--max-prompt-tokens" in err.value.details()


@pytest.mark.parametrize("request_id", ["naïve", "has space", "line\nbreak", "x" * (MAX_REQUEST_ID_CHARS + 1), "\x7f"])
def test_request_ids_that_could_not_travel_in_metadata_or_logs_are_refused(fuzz: FuzzRun, request_id: str) -> None:
    with SluiceClient(fuzz.server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate(make_request("hi", request_id=request_id, max_tokens=2)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request_id ")


def test_longest_visible_ascii_request_id_is_echoed(fuzz: FuzzRun) -> None:
    request_id = "".join(chr(33 + i % 94) for i in range(MAX_REQUEST_ID_CHARS))
    with grpc.insecure_channel(fuzz.server.address) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(make_request("hi", request_id=request_id, max_tokens=2),
                                                         timeout=30)
        assert dict(call.initial_metadata())[REQUEST_ID_METADATA_KEY] == request_id
        assert list(call)[-1].request_id == request_id


def test_malformed_message_on_generate_stream_is_refused_and_the_stream_goes_on(fuzz: FuzzRun) -> None:
    good = pb.GenerateStreamRequest(generate=make_request("hi", request_id="good", max_tokens=3, temperature=0.0))
    bad_utf8 = b"\x0a\x06" + b"\x12\x02\xff\xfe" + b"\x68\x02"  # generate{text=<invalid UTF-8>, max_tokens=2}
    with grpc.insecure_channel(fuzz.server.address) as channel:
        call = channel.stream_stream("/sluice.v1.Generation/GenerateStream")(
            iter([bad_utf8, good.SerializeToString()]), timeout=30)
        responses = [pb.GenerateResponse.FromString(r) for r in call]
    refused = [r for r in responses if r.request_id == ""]
    assert len(refused) == 1 and refused[0].finish_reason == pb.FINISH_REASON_ERROR
    assert refused[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "does not parse" in refused[0].error.message
    assert [r for r in responses if r.request_id == "good"][-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_streams_past_the_per_connection_limit_wait_their_turn(fuzz: FuzzRun) -> None:
    release = threading.Event()

    def holding(i: int):
        """One request, then an open request side until released: the call keeps its stream."""
        yield pb.GenerateStreamRequest(generate=make_request("hold", request_id=f"hold-{i}", max_tokens=1))
        release.wait(60)

    # A connection of its own (channels to one address otherwise share one).
    with grpc.insecure_channel(fuzz.server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        holders = [stub.GenerateStream(holding(i), timeout=60) for i in range(MAX_CONCURRENT_STREAMS)]
        try:
            for i, call in enumerate(holders):
                assert next(call).request_id == f"hold-{i}"  # each call holds an open stream
            extra = stub.Generate(make_request("one more", max_tokens=2), timeout=60)
            done = threading.Event()
            threading.Thread(target=lambda: (list(extra), done.set()), daemon=True).start()
            assert not done.wait(1.5), "a stream past max_concurrent_streams started at once"
            with SluiceClient(fuzz.server.address, timeout=30) as other:  # another connection is not held up
                assert len(other.generate_text("another connection", max_tokens=2)) == 1
            holders[0].cancel()
            assert done.wait(30), "the waiting stream never started after a slot freed"
        finally:
            release.set()
            for call in holders:
                call.cancel()


def test_limit_flags_become_grpc_core_options() -> None:
    args = build_parser().parse_args([
        "serve", "--max-message-bytes", "2000", "--max-concurrent-streams", "7", "--keepalive-time-s", "1.5",
        "--keepalive-timeout-s", "0.25", "--no-keepalive-permit-without-calls", "--keepalive-min-ping-interval-s", "3"])
    assert dict(grpc_options(ServerArgs(**flags_of(args, "server")))) == {
        "grpc.max_receive_message_length": 2000,
        "grpc.max_send_message_length": 2000,
        "grpc.max_concurrent_streams": 7,
        "grpc.keepalive_time_ms": 1500,
        "grpc.keepalive_timeout_ms": 250,
        "grpc.http2.ping_timeout_ms": 250,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.http2.min_recv_ping_interval_without_data_ms": 3000,
    }
    for bad in (dict(max_message_bytes=10), dict(max_prompt_tokens=-1), dict(max_concurrent_streams=0),
                dict(keepalive_time_s=0.0), dict(keepalive_timeout_s=-1.0), dict(keepalive_min_ping_interval_s=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerArgs(**bad)
