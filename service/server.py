"""``sluice serve``: the grpc.aio server, its start-up (load, warm up, then SERVING) and drain.

::

    bind, health NOT_SERVING ─▶ load model (off the loop) ─▶ warm-up generate ─▶ SERVING
    SIGTERM/SIGINT ─▶ NOT_SERVING, new requests UNAVAILABLE ─▶ in-flight finish (≤ shutdown_timeout)
                   ─▶ leftovers aborted ─▶ server stops ─▶ exit 0
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import EngineArgs
from engine.sampling_params import SamplingParams
from service.async_engine import AsyncLLM
from service.servicer import GenerationServicer
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc

logger = logging.getLogger("sluice.server")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerArgs:
    """How the server listens and shuts down (the engine's settings are ``EngineArgs``)."""

    host: str = "127.0.0.1"
    port: int = 50051
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    max_n: int = 16  # most choices (n) one request may ask for

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")


class Server:
    """One grpc.aio server in front of one engine."""

    def __init__(self, engine_args: EngineArgs, server_args: ServerArgs) -> None:
        self.engine_args = engine_args
        self.server_args = server_args
        self.servicer = GenerationServicer(max_n=server_args.max_n)
        self.health = health.aio.HealthServicer()
        self.llm: AsyncLLM | None = None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; the process exit code."""
        # Both belong to the running loop, so they are made here rather than in __init__.
        self._grpc = grpc.aio.server()
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._set_health(_NOT_SERVING)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((GENERATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME),
                                            self._grpc)
        address = f"{self.server_args.host}:{self.server_args.port}"
        port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        logger.info("listening on %s:%d; health NOT_SERVING until the model is loaded and warmed up",
                    self.server_args.host, port)
        try:
            self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args)
        except Exception:
            logger.exception("loading the model failed")
            await self._grpc.stop(None)
            return 1
        self.llm.start(on_dead=self._on_engine_dead)
        logger.info("engine: %s", json.dumps(engine_summary(self.llm)))
        started = time.monotonic()
        await warm_up(self.llm)
        if self.llm.dead_reason:
            logger.error("warm-up failed: %s", self.llm.dead_reason)
            await self._grpc.stop(None)
            return 1
        logger.info("warm-up done in %.2f s", time.monotonic() - started)
        self.servicer.attach(self.llm)
        if not self._stop.is_set():
            await self._set_health(_SERVING)
            logger.info("serving sluice.v1.Generation on %s:%d", self.server_args.host, port)
        await self._stop.wait()
        await self.drain()
        return 0

    async def drain(self) -> None:
        """Stop admitting, let in-flight requests finish within the timeout, then stop."""
        assert self.llm is not None
        timeout = self.server_args.shutdown_timeout
        logger.info("draining: %d requests in flight, up to %.1f s", self.llm.num_in_flight, timeout)
        self.llm.begin_drain()
        await self.health.enter_graceful_shutdown()
        if not await self.llm.wait_idle(timeout):
            logger.warning("shutdown timeout: aborting %d requests", self.llm.num_in_flight)
        await self.llm.shutdown()
        # Streams that were just aborted still send their final message.
        await self._grpc.stop(grace=1.0)
        logger.info("stopped")

    async def _set_health(self, status: int) -> None:
        for service in ("", GENERATION_SERVICE):
            await self.health.set(service, status)

    def _on_engine_dead(self, reason: str) -> None:
        logger.error("engine failed (%s): health NOT_SERVING, new requests UNAVAILABLE", reason)
        asyncio.ensure_future(self._set_health(_NOT_SERVING))


async def warm_up(llm: AsyncLLM) -> None:
    """One tiny greedy generate through the whole path, so the first client is not the one who
    pays for lazy initialisation."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    async for _ in llm.generate("sluice-warm-up", "Hello", params):
        pass


def engine_summary(llm: AsyncLLM) -> dict[str, object]:
    config = llm.engine.model_config
    return {
        "model": config.name,
        "architecture": config.architecture,
        "dtype": str(config.dtype).removeprefix("torch."),
        "max_model_len": config.max_model_len,
        "vocab_size": llm.engine.vocab_size,
        **llm.engine.cache_info(),
    }


def serve(engine_args: EngineArgs, server_args: ServerArgs) -> int:
    """Run the server in a fresh event loop; returns the exit code."""
    logger.info("engine args: %s", json.dumps(dataclasses.asdict(engine_args)))
    logger.info("server args: %s", json.dumps(dataclasses.asdict(server_args)))
    return asyncio.run(Server(engine_args, server_args).run())
