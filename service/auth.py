"""API keys for the sluice server: a bearer-token check on every RPC, and the tenant each key names.

Keys come from a file (``--api-key-file``) and the ``SLUICE_API_KEYS`` environment variable, one
``key`` or ``key:tenant`` per line (file) or per comma (variable); never from a command-line literal,
which other users of the machine could read in the process list. A key without a tenant label is
its own tenant. Health checks and reflection stay open, so that probes need no key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

API_KEYS_ENV = "SLUICE_API_KEYS"
# Method-name prefixes that answer without a key.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    tenant: str


def parse_keys(entries: Iterable[str]) -> list[ApiKey]:
    """``key`` or ``key:tenant`` entries; blank ones and ``#`` comments are skipped."""
    keys = []
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        key, sep, tenant = entry.partition(":")
        key, tenant = key.strip(), tenant.strip()
        if not key or (sep and not tenant):
            raise ValueError("an API key entry is 'key' or 'key:tenant' with both parts non-empty")
        # An unlabelled key is a tenant of its own, named by a digest so the key is never logged.
        keys.append(ApiKey(key, tenant or "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]))
    return keys


class ApiKeys:
    """The accepted keys and the tenant of each."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        if not keys:
            raise ValueError("no API keys given")
        self.keys = tuple(keys)

    @classmethod
    def load(cls, path: str | None, env_value: str | None) -> ApiKeys | None:
        """The keys of the file and the variable's value; None when neither names any (no auth)."""
        entries = Path(path).read_text().splitlines() if path else []
        entries += env_value.split(",") if env_value else []
        keys = parse_keys(entries)
        if path and not keys:
            raise ValueError(f"the API key file {path} holds no keys")
        return cls(keys) if keys else None

    @property
    def tenants(self) -> set[str]:
        return {k.tenant for k in self.keys}

    def tenant_of_key(self, presented: str) -> str | None:
        """The tenant of ``presented``, or None. Every key is compared, each in constant time, so
        the time taken says nothing about which key came close."""
        found = None
        for k in self.keys:
            if hmac.compare_digest(k.key.encode(), presented.encode()):
                found = k.tenant
        return found

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant of the request whose metadata holds ``authorization: Bearer <key>``."""
        for name, value in metadata or ():
            if name == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    return self.tenant_of_key(token.strip())
        return None


def tenant_cache_salt(tenant: str, client_salt: str | None) -> str:
    """The prefix-cache salt of a tenant's request: tenants never share cached blocks, and a
    client salt still splits one tenant's cache further."""
    digest = hashlib.sha256(tenant.encode()).hexdigest()
    return f"tenant:{digest}" + (f":{client_salt}" if client_salt else "")


async def _unauthenticated(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required "
                        "(metadata 'authorization: Bearer <key>')")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to any RPC but health and reflection without a known key."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.keys.tenant_of(handler_call_details.invocation_metadata) is not None:
            return handler
        # A handler of the same kind and (de)serializers whose body only refuses; a coroutine
        # serves every kind, streaming ones included, in grpc.aio.
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        make = kind[(handler.request_streaming, handler.response_streaming)]
        return make(_unauthenticated, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
