"""Requests that do not parse (a corrupt wire format, invalid UTF-8 in a string field) get
INVALID_ARGUMENT saying so, instead of the UNKNOWN the gRPC framework answers by default.

The interceptor swaps each method's request deserializer for one that returns a
``MalformedMessage`` instead of raising. Methods with a single request refuse it before the
servicer runs; methods with a request stream see it among their messages and answer it
(GenerateStream refuses that one message and keeps the stream open).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """A request message that did not parse, and why."""

    reason: str

    @property
    def message(self) -> str:
        return f"the request message does not parse: {self.reason}"


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return MalformedMessage(str(exc))

    return decode


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Tolerant request decoding for the methods of one service (``/package.Service/``)."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None \
                or not handler_call_details.method.startswith(self.prefix):
            return handler
        decode = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.request_streaming:
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(handler.stream_stream, decode, serialize)
            return grpc.stream_unary_rpc_method_handler(handler.stream_unary, decode, serialize)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_refusing_stream(handler.unary_stream), decode, serialize)
        return grpc.unary_unary_rpc_method_handler(_refusing_unary(handler.unary_unary), decode, serialize)


def _refusing_unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return call


def _refusing_stream(behaviour: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for response in behaviour(request, context):
            yield response

    return call
