"""The ``sluice.v1.Generation`` servicer: admission with status codes, then streaming deltas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from scheduler.scheduler import QueueFullError
from service import validation
from service.async_engine import AsyncLLM, EngineUnavailableError, RequestIdInUseError
from service.auth import ApiKeys, tenant_cache_salt
from service.faults import FaultPlan
from service.request_decoding import MalformedMessage
from service.request_stream import RequestStream
from service.responses import rejection, responses_of
from sluice import __version__
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

REQUEST_ID_METADATA_KEY = "sluice-request-id"
# Responses buffered per GenerateStream call; past this, deltas coalesce in each request's stream.
_STREAM_BUFFER = 16
T = TypeVar("T")


class Rejection(Exception):
    """A request refused before acceptance, with the gRPC status that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _internal_error(request_id: str, exc: Exception) -> str:
    return f"request {request_id} failed on the server ({type(exc).__name__}); the server log has the details"


class GenerationServicer(pb_grpc.GenerationServicer):
    """Serves one ``AsyncLLM``; answers UNAVAILABLE until ``attach`` and while draining."""

    def __init__(self, max_n: int, max_prompt_tokens: int | None = None) -> None:
        self.max_n = max_n
        self.max_prompt_tokens = max_prompt_tokens  # None: only the model's context bounds prompts
        self.llm: AsyncLLM | None = None
        # The server's API keys (None: no authentication); each key's tenant salts its cache.
        self.auth: ApiKeys | None = None
        # Test-only failures (service/faults.py); empty unless the server was started with them.
        self.faults = FaultPlan()

    def attach(self, llm: AsyncLLM) -> None:
        self.llm = llm

    # ------------------------------------------------------------------ admission
    def _engine(self) -> AsyncLLM:
        if self.llm is None:
            raise Rejection(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.llm

    def _tenant(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's tenant; the interceptor has already refused calls without a known key."""
        return self.auth.tenant_of(context.invocation_metadata()) if self.auth else None

    async def _submit(self, request: pb.GenerateRequest, tenant: str | None = None,
                      id_required: bool = False) -> RequestStream:
        llm = self._engine()
        field = validation.prompt_field(request)
        try:
            request_id = validation.request_id_of(request, id_required)
            prompt = validation.prompt_of(request, llm.info.vocab_size, self.max_prompt_tokens)
            params = validation.sampling_params_of(request, self.max_n)
            cache_salt = validation.cache_salt_of(request)
            if tenant is not None:
                cache_salt = tenant_cache_salt(tenant, cache_salt)
            # Tokenizing a long text takes a while; the loop keeps serving other streams meanwhile.
            prepared = await asyncio.to_thread(llm.prepare, request_id, prompt, params, request.priority,
                                               cache_salt)
            validation.check_prompt_tokens(field, len(prepared.prompt_token_ids), self.max_prompt_tokens)
        except ValueError as exc:
            message = str(exc)
            # The engine speaks of "the prompt"; the caller knows it by its field.
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field}: {message}" if message.startswith("prompt") else message) from exc
        try:
            return llm.submit(prepared)
        except RequestIdInUseError as exc:
            raise Rejection(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        except EngineUnavailableError as exc:
            raise Rejection(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc

    @staticmethod
    async def _accepted(stream: RequestStream) -> None:
        try:
            await stream.wait_accepted()
        except QueueFullError as exc:
            raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except EngineUnavailableError as exc:
            raise Rejection(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except ValueError as exc:  # the engine's own last checks
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

    async def _responses(self, stream: RequestStream) -> AsyncIterator[pb.GenerateResponse]:
        """The messages of an accepted request, one per choice per delta."""
        async for delta in stream:
            self.faults.check_delta(stream.request_id)
            for response in responses_of(delta, stream):
                yield response

    # ------------------------------------------------------------------ streaming RPCs
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            stream = await self._submit(request, self._tenant(context))
        except Rejection as r:
            await context.abort(r.code, r.message)
        try:
            try:
                await self._accepted(stream)
            except Rejection as r:
                await context.abort(r.code, r.message)
            await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, stream.request_id),))
            try:
                async for response in self._responses(stream):
                    yield response
            except Exception as exc:  # one request's failure ends that request only
                logger.exception("Generate: request %s failed", stream.request_id)
                await context.abort(grpc.StatusCode.INTERNAL, _internal_error(stream.request_id, exc))
        finally:
            stream.close()

    async def GenerateStream(self, request_iterator: AsyncIterator[pb.GenerateStreamRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        # Bounded, so that a slow reader leaves deltas to coalesce in each request's stream.
        outbox: asyncio.Queue[pb.GenerateResponse | None] = asyncio.Queue(_STREAM_BUFFER)
        tasks: dict[str, asyncio.Task[None]] = {}
        tenant = self._tenant(context)

        async def run(stream: RequestStream) -> None:
            try:
                await self._accepted(stream)
                async for response in self._responses(stream):
                    await outbox.put(response)
            except Rejection as r:
                await outbox.put(rejection(stream.request_id, r.code, r.message))
            except Exception as exc:  # one request's failure ends that request only
                logger.exception("GenerateStream: request %s failed", stream.request_id)
                await outbox.put(rejection(stream.request_id, grpc.StatusCode.INTERNAL,
                                           _internal_error(stream.request_id, exc)))
            finally:
                stream.close()

        async def start(request: pb.GenerateRequest) -> pb.GenerateResponse | None:
            try:
                stream = await self._submit(request, tenant, id_required=True)
            except Rejection as r:
                return rejection(request.request_id, r.code, r.message)
            rid = stream.request_id
            task = tasks[rid] = asyncio.create_task(run(stream))
            task.add_done_callback(lambda t: tasks.pop(rid) if tasks.get(rid) is t else None)
            return None

        async def read() -> None:
            try:
                async for message in request_iterator:
                    if isinstance(message, MalformedMessage):  # see service/request_decoding.py
                        await outbox.put(rejection("", grpc.StatusCode.INVALID_ARGUMENT, message.message))
                    elif message.HasField("cancel"):
                        rid = message.cancel.request_id
                        if rid in tasks and self.llm is not None:
                            self.llm.abort([rid])
                    elif (refused := await start(message.generate)) is not None:
                        await outbox.put(refused)
            except Exception:
                logger.exception("GenerateStream: reading requests failed")
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await outbox.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await outbox.get()) is not None:
                yield response
        finally:
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()

    # ------------------------------------------------------------------ unary RPCs
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if self.llm is None:
            return pb.AbortResponse()
        return pb.AbortResponse(aborted_request_ids=self.llm.abort(list(request.request_ids)))

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        llm = await self._unary_engine(context)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        # Off the loop, as for prompts: a long text must not stall every stream.
        token_ids = await asyncio.to_thread(llm.info.tokenizer.encode, request.text, add_special)
        return pb.TokenizeResponse(token_ids=token_ids)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        llm = await self._unary_engine(context)
        vocab_size = llm.info.vocab_size
        bad = [t for t in request.token_ids if t >= vocab_size]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await asyncio.to_thread(llm.info.tokenizer.decode, list(request.token_ids), skip)
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        llm = await self._unary_engine(context)
        config, cache = llm.info.model_config, llm.info.cache_info
        quantization = (config.quantization_config or {}).get("quant_method", "")
        return pb.ModelInfo(
            name=config.name,
            path=str(config.path),
            architecture=config.architecture,
            vocab_size=llm.info.vocab_size,
            max_model_len=config.max_model_len,
            dtype=str(config.dtype).removeprefix("torch."),
            quantization=quantization,
            attention_backend=str(cache["attention_backend"]),
            block_size=int(cache["block_size"]),
            num_kv_blocks=int(cache["num_kv_blocks"]),
            sluice_version=__version__,
            max_n=self.max_n,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.Load:
        load = await self._between_steps(context, AsyncLLM.get_load)
        return pb.Load(
            num_running=load["num_running"],
            num_waiting=load["num_waiting"],
            kv_blocks_used=load["kv_blocks_used"],
            kv_blocks_total=load["kv_blocks_total"],
            tokens_per_second=load["generation_tokens_per_s"],
            prefix_cache_hit_rate=load["prefix_cache_hit_rate"],
            spec_decode_acceptance_rate=load["spec_decode_acceptance_rate"],
            spec_decode_mean_accepted_length=load["spec_decode_mean_accepted_length"],
        )

    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest,
                               context: grpc.aio.ServicerContext) -> pb.ResetPrefixCacheResponse:
        reset = await self._between_steps(context, AsyncLLM.reset_prefix_cache)
        logger.info("prefix cache reset: %s", reset)
        return pb.ResetPrefixCacheResponse(reset=reset)

    async def _between_steps(self, context: grpc.aio.ServicerContext,
                             call: Callable[[AsyncLLM], Awaitable[T]]) -> T:
        """Run one of the bridge's engine-thread calls; UNAVAILABLE when the engine cannot."""
        llm = await self._unary_engine(context)
        try:
            return await call(llm)
        except EngineUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise

    async def _unary_engine(self, context: grpc.aio.ServicerContext) -> AsyncLLM:
        try:
            return self._engine()
        except Rejection as r:
            await context.abort(r.code, r.message)
            raise
