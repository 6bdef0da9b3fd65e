"""Security of a real ``sluice serve`` process: mutual TLS, API keys on every RPC but health, and
prefix caches that tenants never share. The certificates are made here with ``cryptography``."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.auth import ApiKeys, parse_keys, tenant_cache_salt
from service.client import SluiceClient
from service.server import is_loopback
from tests.service_fixtures import ServerProcess, start_server, wait_until_serving_through

BLOCK_SIZE = 16  # the server's default --block-size
KEYS_FILE = "# tenants\nkey-alice:alice\nkey-bob:bob\n\nkey-unlabelled\n"
ENV_KEY = "key-carol"
GREEDY = dict(temperature=0.0, max_tokens=4, ignore_eos=True)


@dataclass
class Pki:
    ca: bytes
    client_cert: bytes
    client_key: bytes
    other_cert: bytes  # a client certificate signed by a CA the server does not trust
    other_key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool = False, sans: list[x509.GeneralName] | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _make_pki(directory: Path) -> Pki:
    ca_key, other_ca_key, server_key, client_key, other_key = (ec.generate_private_key(ec.SECP256R1())
                                                               for _ in range(5))
    ca = _cert("sluice test CA", ca_key, None, ca_key, ca=True)
    other_ca = _cert("untrusted CA", other_ca_key, None, other_ca_key, ca=True)
    server = _cert("localhost", server_key, ca.subject, ca_key,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("client", client_key, ca.subject, ca_key)
    other = _cert("intruder", other_key, other_ca.subject, other_ca_key)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (directory / "ca.pem").write_bytes(pem(ca))
    (directory / "server.pem").write_bytes(pem(server))
    (directory / "server.key").write_bytes(_key_pem(server_key))
    return Pki(pem(ca), pem(client), _key_pem(client_key), pem(other), _key_pem(other_key))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    """One server with mutual TLS and API keys (file + environment), SERVING; and its PKI."""
    directory = tmp_path_factory.mktemp("security")
    pki = _make_pki(directory)
    (directory / "keys.txt").write_text(KEYS_FILE)
    with pytest.MonkeyPatch.context() as env:  # the server process inherits the variable
        env.setenv("SLUICE_API_KEYS", ENV_KEY)
        srv = start_server(service_model, directory / "logs", "--num-kv-blocks", "64", "--max-model-len", "512",
                           "--tls-cert", str(directory / "server.pem"), "--tls-key", str(directory / "server.key"),
                           "--tls-client-ca", str(directory / "ca.pem"),
                           "--api-key-file", str(directory / "keys.txt"))
    try:
        _wait_serving(srv, pki)
        yield srv, pki
    finally:
        srv.stop()


def _client(srv: ServerProcess, pki: Pki, api_key: str | None = None, **tls) -> SluiceClient:
    tls = tls or dict(private_key=pki.client_key, certificate_chain=pki.client_cert)
    return SluiceClient(srv.address, timeout=30, api_key=api_key, root_certificates=pki.ca, **tls)


def _wait_serving(srv: ServerProcess, pki: Pki) -> None:
    with _client(srv, pki) as client:
        client.timeout = 1.0
        wait_until_serving_through(srv, client)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ------------------------------------------------------------------------------------- TLS
def test_mutual_tls_with_a_trusted_client_certificate_serves(secure) -> None:
    srv, pki = secure
    with _client(srv, pki, api_key="key-alice") as client:
        assert client.health() == "SERVING"
        assert client.tokenize("hello world") == client.tokenize("hello world") != []


def test_plaintext_and_clients_without_a_trusted_certificate_are_refused(secure) -> None:
    srv, pki = secure
    attempts = {
        "plaintext": SluiceClient(srv.address, timeout=5, api_key="key-alice"),
        "no client certificate": SluiceClient(srv.address, timeout=5, api_key="key-alice",
                                              root_certificates=pki.ca),
        "untrusted client certificate": _client(srv, pki, "key-alice", private_key=pki.other_key,
                                                certificate_chain=pki.other_cert),
    }
    for name, client in attempts.items():
        with client:
            assert _code(client.health) == grpc.StatusCode.UNAVAILABLE, name
            assert _code(functools.partial(client.tokenize, "hi")) == grpc.StatusCode.UNAVAILABLE, name


# ------------------------------------------------------------------------------------- API keys
@pytest.mark.parametrize("api_key", [None, "wrong-key", "key-alice:alice", "key-alic"])
def test_missing_or_wrong_key_is_unauthenticated_on_every_generation_rpc(secure, api_key) -> None:
    srv, pki = secure
    with _client(srv, pki, api_key) as client:
        calls = {
            "Generate": lambda: list(client.generate("hello", **GREEDY)),
            "GetModelInfo": client.model_info,
            "GetLoad": client.load,
            "Tokenize": lambda: client.tokenize("hello"),
            "Abort": lambda: client.cancel("nothing"),
            "ResetPrefixCache": client.reset_prefix_cache,
        }
        for name, call in calls.items():
            assert _code(call) == grpc.StatusCode.UNAUTHENTICATED, name
        assert client.health() == "SERVING"  # probes need no key


@pytest.mark.parametrize("api_key", ["key-alice", "key-bob", "key-unlabelled", ENV_KEY])
def test_every_configured_key_is_accepted(secure, api_key) -> None:
    srv, pki = secure
    with _client(srv, pki, api_key) as client:
        assert client.model_info().max_model_len > 0
        assert client.cancel("nothing") == []
        assert len(client.generate_text("hello", **GREEDY)) == 1


def test_tenants_never_share_cached_prefixes(secure) -> None:
    srv, pki = secure
    rng = random.Random(7)
    prompt = [rng.randrange(2, 500) for _ in range(4 * BLOCK_SIZE + 5)]

    def cached(api_key: str, **fields) -> int:
        with _client(srv, pki, api_key) as client:
            return list(client.generate(prompt, **GREEDY, **fields))[-1].usage.cached_prompt_tokens

    assert cached("key-alice") == 0
    assert cached("key-alice") == 4 * BLOCK_SIZE
    # Same prompt, same client salt as nobody: another tenant still computes every block.
    assert cached("key-bob") == 0
    assert cached("key-bob") == 4 * BLOCK_SIZE
    # A client salt splits one tenant's cache further, and cannot reach into another's.
    assert cached("key-alice", cache_salt="x") == 0
    assert cached(ENV_KEY, cache_salt="x") == 0


# ------------------------------------------------------------------------------------- units
def test_key_parsing_and_tenant_salts() -> None:
    keys = ApiKeys(parse_keys(KEYS_FILE.splitlines() + [ENV_KEY]))
    bearer = lambda key: [("authorization", f"Bearer {key}")]  # noqa: E731
    assert keys.tenant_of(bearer("key-alice")) == "alice"
    assert keys.tenant_of(bearer("key-bob")) == "bob"
    assert keys.tenant_of(bearer("key-unlabelled")).startswith("key-")
    assert keys.tenant_of(bearer("key-unlabelled")) != keys.tenant_of(bearer(ENV_KEY))
    assert keys.tenant_of(bearer("key-ali")) is None
    assert keys.tenant_of([("authorization", "key-alice")]) is None
    assert keys.tenant_of(None) is None
    with pytest.raises(ValueError):
        parse_keys(["key:"])
    salts = {tenant_cache_salt(t, s) for t in ("alice", "bob") for s in (None, "x")}
    assert len(salts) == 4
    assert tenant_cache_salt("alice", None) == tenant_cache_salt("alice", None)


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.com"))
