"""Security of a real ``sluice serve`` process beyond tests/test_service_security.py (which covers
mutual TLS and tenant isolation): server-only TLS, API keys on every Generation RPC (enumerated from
the service descriptor, so a new RPC is covered the day it is added), what the log may and may not
hold, and the warning for plaintext on a non-loopback address."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import SluiceClient, make_request
from sluice.v1 import generation_pb2 as pb
from tests.service_fixtures import (
    REPO_ROOT,
    ServerProcess,
    free_port,
    start_server,
    wait_until_serving_through,
)

KEYS = {"key-alice-7c1f": "alice", "key-bob-93ad": "bob"}
GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
SECRET_PROMPT = "platypus saxophone lighthouse"
GENERATION = pb.DESCRIPTOR.services_by_name["Generation"]


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    """TLS without client certificates, and API keys; (server, its certificate as PEM)."""
    directory = tmp_path_factory.mktemp("tls-server")
    cert, key = _self_signed(directory, "server")
    keys_file = directory / "keys.txt"
    keys_file.write_text("".join(f"{k}:{tenant}\n" for k, tenant in KEYS.items()))
    srv = start_server(service_model, directory / "logs", "--num-kv-blocks", "64", "--max-model-len", "512",
                       "--tls-cert", str(cert), "--tls-key", str(key), "--api-key-file", str(keys_file))
    try:
        _wait_serving(srv, cert.read_bytes())
        yield srv, cert.read_bytes()
    finally:
        srv.stop()


def _wait_serving(srv: ServerProcess, ca: bytes) -> None:
    with SluiceClient(srv.address, timeout=1.0, root_certificates=ca) as client:
        wait_until_serving_through(srv, client)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_server_only_tls_serves_and_plaintext_or_an_untrusted_server_fails(tls_server, tmp_path: Path) -> None:
    srv, ca = tls_server
    with SluiceClient(srv.address, timeout=30, api_key="key-alice-7c1f", root_certificates=ca) as client:
        assert client.health() == "SERVING"
        assert len(client.generate_text("hello", **GREEDY)) == 1
    impostor_cert, _ = _self_signed(tmp_path, "impostor")  # the client trusts a different certificate
    for client in (SluiceClient(srv.address, timeout=5, api_key="key-alice-7c1f"),
                   SluiceClient(srv.address, timeout=5, api_key="key-alice-7c1f",
                                root_certificates=impostor_cert.read_bytes())):
        with client:
            assert _code(client.health) == grpc.StatusCode.UNAVAILABLE
            assert _code(lambda: client.tokenize("hi")) == grpc.StatusCode.UNAVAILABLE  # noqa: B023


def _call_every_method(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> dict[str, grpc.StatusCode]:
    """Call each Generation RPC once (a valid request for Generate, empty ones elsewhere)."""
    codes = {}
    for method in GENERATION.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class()
        if method.name == "Generate":
            request = make_request("hi", max_tokens=2)
        elif method.name == "GenerateStream":
            request = pb.GenerateStreamRequest(generate=make_request("hi", request_id="s", max_tokens=2))
        path = f"/{GENERATION.full_name}/{method.name}"
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}
        callable_ = kind[(method.client_streaming, method.server_streaming)](
            path, request_serializer=type(request).SerializeToString, response_deserializer=response_class.FromString)
        argument = iter([request]) if method.client_streaming else request
        if method.server_streaming:
            codes[method.name] = _code(lambda: list(callable_(argument, timeout=30, metadata=metadata)))  # noqa: B023
        else:
            codes[method.name] = _code(lambda: callable_(argument, timeout=30, metadata=metadata))  # noqa: B023
    return codes


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer key-mallory"),),
                                      (("authorization", "key-alice-7c1f"),),
                                      (("authorization", "Basic key-alice-7c1f"),),
                                      (("x-api-key", "key-alice-7c1f"),)],
                         ids=["missing", "unknown key", "no scheme", "wrong scheme", "wrong header"])
def test_every_generation_rpc_refuses_a_missing_or_wrong_key_and_health_stays_open(tls_server, metadata) -> None:
    srv, ca = tls_server
    with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(ca)) as channel:
        codes = _call_every_method(channel, metadata)
        assert set(codes) == {m.name for m in GENERATION.methods} and len(codes) >= 8
        assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED), codes
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30,
                                                            metadata=metadata)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_valid_key_reaches_every_rpc(tls_server) -> None:
    srv, ca = tls_server
    with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(ca)) as channel:
        codes = _call_every_method(channel, (("authorization", "Bearer key-bob-93ad"),))
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
    assert codes["Generate"] == codes["GenerateStream"] == codes["GetLoad"] == grpc.StatusCode.OK


def test_the_log_holds_request_ids_but_no_prompt_output_or_key(tls_server) -> None:
    srv, ca = tls_server
    with SluiceClient(srv.address, timeout=30, api_key="key-alice-7c1f", root_certificates=ca) as client:
        texts = []
        for i in range(3):
            deltas = list(client.generate(make_request(f"{SECRET_PROMPT} {i}", request_id=f"audit-{i}", **GREEDY)))
            texts.append("".join(d.text for d in deltas))
    log = srv.log()
    for i in range(3):
        assert f"request_id=audit-{i} " in log
    for word in SECRET_PROMPT.split():
        assert word not in log
    for text in texts:
        assert len(text) >= 8 and text not in log
    for key in KEYS:
        assert key not in log
    assert "TLS on; client certificates not required" in log


def test_plaintext_on_a_non_loopback_address_is_warned_about_and_limits_are_logged(tmp_path: Path) -> None:
    """A server on 0.0.0.0 whose model is missing: it logs its set-up, then exits for the model."""
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0",
                               "--port", str(free_port()), "--model", str(tmp_path / "no-such-model"),
                               "--max-prompt-tokens", "1000"],
                              cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    text = log_path.read_text()
    assert done.returncode == 1, text
    assert "WARNING sluice.server: serving PLAINTEXT on non-loopback address 0.0.0.0" in text
    limits = next(line for line in text.splitlines() if "limits: " in line)
    for flag_value in ('"max_message_bytes": 4194304', '"max_prompt_tokens": 1000', '"max_n": 16',
                       '"max_concurrent_streams": 256', '"keepalive_time_s": 60.0', '"keepalive_timeout_s": 20.0',
                       '"keepalive_permit_without_calls": true', '"keepalive_min_ping_interval_s": 10.0'):
        assert flag_value in limits, limits
    assert "loading the model failed" in text
