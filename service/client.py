"""Python clients for a sluice server: ``SluiceClient`` (blocking) and ``AsyncSluiceClient`` (asyncio).

::

    with SluiceClient("127.0.0.1:50051") as client:
        for delta in client.generate("Once upon a time", max_tokens=32, temperature=0.0):
            print(delta.text, end="", flush=True)

``generate`` yields ``GenerateResponse`` deltas; sampling keywords are the request's field names
(``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``n``, ...). Leaving the loop early cancels
the call, which aborts the request on the server.

``api_key`` is sent as ``authorization: Bearer <key>`` on every call; ``root_certificates``
(PEM bytes) connects with TLS, and ``private_key`` with ``certificate_chain`` present a client
certificate to a server that requires one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# A prompt as text or token ids, or a whole request built with ``make_request``.
Prompt = str | Sequence[int] | pb.GenerateRequest


def make_request(prompt: str | Sequence[int], *, request_id: str | None = None, priority: int = 0,
                 cache_salt: str | None = None, **sampling: Any) -> pb.GenerateRequest:
    """A ``GenerateRequest`` for a text or token-id prompt. Without ``request_id`` a fresh one is
    made here, so that the caller can cancel the request by id. Requests share cached prompt
    prefixes only with requests of the same ``cache_salt`` (None: the shared cache)."""
    request = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, priority=priority,
                                 cache_salt=cache_salt, **sampling)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.extend(prompt)
    return request


def secure_credentials(root_certificates: bytes | None, private_key: bytes | None,
                       certificate_chain: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when any PEM is given, else None (plaintext)."""
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def health_status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class SluiceClient:
    """A blocking client. ``timeout`` (seconds) is the default deadline of each call."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 channel: grpc.Channel | None = None, api_key: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None) -> None:
        credentials = secure_credentials(root_certificates, private_key, certificate_chain)
        self.channel = channel or (grpc.secure_channel(address, credentials) if credentials
                                   else grpc.insecure_channel(address))
        self.metadata = auth_metadata(api_key)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> SluiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: Prompt, *, timeout: float | None = None,
                 **sampling: Any) -> Iterator[pb.GenerateResponse]:
        """Stream the deltas of one request; closing the iterator early cancels it."""
        request = prompt if isinstance(prompt, pb.GenerateRequest) else make_request(prompt, **sampling)
        call = self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def generate_text(self, prompt: str | Sequence[int], **sampling: Any) -> list[str]:
        """The full text of each choice (index order)."""
        texts: dict[int, str] = {}
        for delta in self.generate(prompt, **sampling):
            texts[delta.index] = texts.get(delta.index, "") + delta.text
        return [texts[i] for i in sorted(texts)]

    def cancel(self, *request_ids: str) -> list[str]:
        """Abort requests by id; returns those that were in flight."""
        response = self.stub.Abort(pb.AbortRequest(request_ids=request_ids), timeout=self.timeout,
                                   metadata=self.metadata)
        return list(response.aborted_request_ids)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(request, timeout=self.timeout, metadata=self.metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def load(self) -> pb.Load:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout, metadata=self.metadata)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block on the server; requests running now go on."""
        request = pb.ResetPrefixCacheRequest()
        return self.stub.ResetPrefixCache(request, timeout=self.timeout, metadata=self.metadata).reset

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... for the whole server ("") or one service."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status_name(self.health_stub.Check(request, timeout=self.timeout, metadata=self.metadata).status)


class AsyncSluiceClient:
    """An asyncio client; use it inside a running event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 channel: grpc.aio.Channel | None = None, api_key: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None) -> None:
        credentials = secure_credentials(root_certificates, private_key, certificate_chain)
        self.channel = channel or (grpc.aio.secure_channel(address, credentials) if credentials
                                   else grpc.aio.insecure_channel(address))
        self.metadata = auth_metadata(api_key)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncSluiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: Prompt, *, timeout: float | None = None,
                       **sampling: Any) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the deltas of one request; leaving the loop early cancels it."""
        request = prompt if isinstance(prompt, pb.GenerateRequest) else make_request(prompt, **sampling)
        call = self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            async for delta in call:
                yield delta
        finally:
            call.cancel()

    async def generate_text(self, prompt: str | Sequence[int], **sampling: Any) -> list[str]:
        """The full text of each choice (index order)."""
        texts: dict[int, str] = {}
        async for delta in self.generate(prompt, **sampling):
            texts[delta.index] = texts.get(delta.index, "") + delta.text
        return [texts[i] for i in sorted(texts)]

    def stream(self, *, timeout: float | None = None) -> GenerationStream:
        """Open a ``GenerateStream``: many requests, and per-request cancel, on one call."""
        return GenerationStream(self.stub, timeout or self.timeout, self.metadata)

    async def cancel(self, *request_ids: str) -> list[str]:
        response = await self.stub.Abort(pb.AbortRequest(request_ids=request_ids), timeout=self.timeout,
                                         metadata=self.metadata)
        return list(response.aborted_request_ids)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self.stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self.stub.Detokenize(request, timeout=self.timeout, metadata=self.metadata)).text

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    async def load(self) -> pb.Load:
        return await self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout, metadata=self.metadata)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block on the server; requests running now go on."""
        request = pb.ResetPrefixCacheRequest()
        return (await self.stub.ResetPrefixCache(request, timeout=self.timeout, metadata=self.metadata)).reset

    async def health(self, service: str = "") -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health_stub.Check(request, timeout=self.timeout, metadata=self.metadata)
        return health_status_name(response.status)


class GenerationStream:
    """One bidirectional ``GenerateStream`` call: ``submit`` and ``cancel`` requests while
    iterating over the tagged responses of all of them. ``close`` half-closes the request side
    (nothing can be submitted or cancelled after it); the server then ends the stream once every
    request on it has finished."""

    def __init__(self, stub: pb_grpc.GenerationStub, timeout: float | None,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._outgoing: asyncio.Queue[pb.GenerateStreamRequest | None] = asyncio.Queue()
        self.call = stub.GenerateStream(self._requests(), timeout=timeout, metadata=tuple(metadata))

    async def _requests(self) -> AsyncIterator[pb.GenerateStreamRequest]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    def submit(self, prompt: Prompt, **sampling: Any) -> str:
        """Start a request on the stream; returns its request id."""
        request = prompt if isinstance(prompt, pb.GenerateRequest) else make_request(prompt, **sampling)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        self._outgoing.put_nowait(pb.GenerateStreamRequest(generate=request))
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Cancel one request; it ends with FINISH_REASON_ABORTED, the others go on."""
        self._outgoing.put_nowait(pb.GenerateStreamRequest(cancel=pb.CancelRequest(request_id=request_id)))

    def close(self) -> None:
        self._outgoing.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self.call.__aiter__()
