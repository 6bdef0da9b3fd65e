"""Requests refused before acceptance: INVALID_ARGUMENT naming the field, through a real server,
and the request-to-SamplingParams mapping itself."""

from __future__ import annotations

import math
import re

import grpc
import pytest

from engine.sampling_params import SamplingParams
from service.validation import cache_salt_of, sampling_params_of
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc
from tests.service_fixtures import MAX_N, SERVICE_MODEL_LEN, ServerProcess

# (case, request fields, the field name the message must contain)
BAD_REQUESTS = [
    ("both prompts", dict(text="hi", token_ids=[5, 6]), "token_ids"),
    ("no prompt", dict(), "text"),
    ("empty text", dict(text=""), "text"),
    ("token id outside vocabulary", dict(token_ids=[5, 10**6]), "token_ids"),
    ("over max_model_len", dict(text="hi", max_tokens=SERVICE_MODEL_LEN), "max_tokens"),
    ("negative temperature", dict(text="hi", temperature=-0.5), "temperature"),
    ("nan temperature", dict(text="hi", temperature=math.nan), "temperature"),
    ("top_p zero", dict(text="hi", top_p=0.0), "top_p"),
    ("top_p above one", dict(text="hi", top_p=1.5), "top_p"),
    ("top_k below -1", dict(text="hi", top_k=-2), "top_k"),
    ("n zero", dict(text="hi", n=0), "n"),
    ("n over the limit", dict(text="hi", n=MAX_N + 1), "n"),
    ("min_tokens over max_tokens", dict(text="hi", max_tokens=4, min_tokens=5), "min_tokens"),
    ("max_tokens zero", dict(text="hi", max_tokens=0), "max_tokens"),
    ("stop token outside vocabulary", dict(text="hi", stop_token_ids=[10**6]), "stop_token_ids"),
    ("logprobs over the limit", dict(text="hi", logprobs=21), "logprobs"),
]


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.mark.parametrize(("fields", "name"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_field_is_invalid_argument_naming_it(stub, fields: dict, name: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(rf"\b{name}\b", err.value.details()), err.value.details()


def test_refused_requests_leave_the_server_idle(stub) -> None:
    load = stub.GetLoad(pb.GetLoadRequest(), timeout=30)
    assert (load.num_running, load.num_waiting, load.kv_blocks_used) == (0, 0, 0)


def test_unknown_request_id_in_abort_is_not_an_error(stub) -> None:
    response = stub.Abort(pb.AbortRequest(request_ids=["never-seen"]), timeout=30)
    assert list(response.aborted_request_ids) == []


def test_request_id_in_flight_is_already_exists(stub) -> None:
    request = pb.GenerateRequest(request_id="twice", text="hi", max_tokens=2000, ignore_eos=True)
    first = stub.Generate(request, timeout=60)
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.value.details()
    first.cancel()


def test_unset_fields_take_sampling_defaults_and_zero_is_kept() -> None:
    assert sampling_params_of(pb.GenerateRequest(text="x"), MAX_N) == SamplingParams()
    greedy = sampling_params_of(pb.GenerateRequest(text="x", temperature=0.0, top_k=0, seed=0), MAX_N)
    assert (greedy.temperature, greedy.top_k, greedy.seed) == (0.0, -1, 0)


def test_every_field_reaches_sampling_params() -> None:
    request = pb.GenerateRequest(
        text="x", temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={3: -2.0}, seed=11, max_tokens=9,
        min_tokens=2, stop=["\n\n"], stop_token_ids=[4], ignore_eos=True, include_stop_str_in_output=True,
        logprobs=2, n=2, skip_special_tokens=False,
    )
    assert sampling_params_of(request, MAX_N) == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.2, logit_bias={3: -2.0}, seed=11, max_tokens=9, min_tokens=2, stop=["\n\n"],
        stop_token_ids=[4], ignore_eos=True, include_stop_str_in_output=True, logprobs=2, n=2,
        skip_special_tokens=False,
    )
    assert sampling_params_of(pb.GenerateRequest(text="x", detokenize=False), MAX_N).detokenize is False


def test_cache_salt_is_a_request_option_and_empty_means_the_shared_cache() -> None:
    salted = pb.GenerateRequest(text="x", cache_salt="tenant-a")
    assert cache_salt_of(salted) == "tenant-a"
    assert sampling_params_of(salted, MAX_N) == SamplingParams()
    assert cache_salt_of(pb.GenerateRequest(text="x")) is None
    assert cache_salt_of(pb.GenerateRequest(text="x", cache_salt="")) is None
