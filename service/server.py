"""``sluice serve``: the grpc.aio server, its start-up (load, warm up, then SERVING) and drain.

::

    bind, health NOT_SERVING ─▶ load model (off the loop) ─▶ warm-up generate ─▶ SERVING
    SIGTERM/SIGINT ─▶ NOT_SERVING, new requests UNAVAILABLE ─▶ in-flight finish (≤ shutdown_timeout)
                   ─▶ leftovers aborted ─▶ server stops ─▶ exit 0
    engine failure ─▶ in-flight requests end with an error ─▶ NOT_SERVING for FAILED_HEALTH_WINDOW_S
                   ─▶ server stops ─▶ exit 1 (an orchestrator restarts it)
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import EngineArgs
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from service.async_engine import AsyncLLM, EngineUnavailableError
from service.auth import API_KEYS_ENV, ApiKeys, AuthInterceptor
from service.faults import FAULT_INJECT_ENV, FaultPlan
from service.log_format import LOG_FORMATS
from service.metrics import FinishedRequest, ServerMetrics
from service.request_decoding import RequestDecodingInterceptor
from service.request_stream import RequestStream
from service.servicer import GenerationServicer
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc

logger = logging.getLogger("sluice.server")

LOAD_POLL_INTERVAL_S = 0.5  # how often the metrics' engine gauges are refreshed
# After an engine failure, health probes and load balancers see NOT_SERVING this long before the port closes.
FAILED_HEALTH_WINDOW_S = 2.0
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
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS instead of plaintext
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle; clients must present a certificate it signed
    api_key_file: str | None = None  # one 'key' or 'key:tenant' a line; also $SLUICE_API_KEYS
    metrics_port: int = 0  # Prometheus /metrics over HTTP on host:metrics_port; 0 = off
    log_format: str = "text"  # "text" or "json" (one object per line)
    # Output tokens a stream gathers before it sends a message (the first and the last go at
    # once): fewer, larger messages leave more of the process to the engine under heavy load.
    stream_interval: int = 1
    # Run the engine in a process of its own (spawned), so that sending gRPC messages and
    # stepping the model do not share one GIL; off: a thread of the server's process.
    engine_process: bool = True
    # How long (ms) a Python thread may hold the GIL while another waits for it (Python's default:
    # 5). With the engine on a thread (--no-engine-process) it wakes from each device step needing
    # the GIL, which the asyncio thread (sending messages) holds: a shorter interval lets the next
    # step start sooner.
    gil_switch_interval_ms: float = 0.5
    # Limits that keep one client from taking the server down.
    max_message_bytes: int = 4 * 1024 * 1024  # largest request (and response) message
    max_prompt_tokens: int = 0  # longest prompt; 0 = as long as the model's context allows
    max_concurrent_streams: int = 256  # calls in flight on one client connection; more wait their turn
    keepalive_time_s: float = 60.0  # ping a connection silent this long, to find dead clients
    keepalive_timeout_s: float = 20.0  # close a connection whose ping goes unanswered this long
    keepalive_permit_without_calls: bool = True  # clients may ping connections without calls...
    keepalive_min_ping_interval_s: float = 10.0  # ...but no more often than this (else GOAWAY)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.gil_switch_interval_ms <= 0:
            raise ValueError(f"gil_switch_interval_ms must be > 0, got {self.gil_switch_interval_ms}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be >= 0 (0: the model's context), got {self.max_prompt_tokens}")
        if self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1, got {self.max_concurrent_streams}")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "keepalive_min_ping_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")


class Server:
    """One grpc.aio server in front of one engine."""

    def __init__(self, engine_args: EngineArgs, server_args: ServerArgs) -> None:
        self.engine_args = engine_args
        self.server_args = server_args
        self.auth = ApiKeys.load(server_args.api_key_file, os.environ.get(API_KEYS_ENV))
        self.faults = FaultPlan.parse(os.environ.get(FAULT_INJECT_ENV))
        self.servicer = GenerationServicer(max_n=server_args.max_n,
                                           max_prompt_tokens=server_args.max_prompt_tokens or None)
        self.servicer.auth = self.auth
        self.servicer.faults = self.faults
        self.health = health.aio.HealthServicer()
        self.llm: AsyncLLM | None = None
        self.metrics = ServerMetrics()
        self._exit_code = 0

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit code 0) or an engine failure (1), then drain."""
        # Both belong to the running loop, so they are made here rather than in __init__.
        interceptors = [AuthInterceptor(self.auth)] if self.auth else []
        interceptors.append(RequestDecodingInterceptor(GENERATION_SERVICE))
        self._grpc = grpc.aio.server(interceptors=interceptors, options=grpc_options(self.server_args))
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
        port = self._bind(address)
        logger.info("limits: %s", json.dumps(limits(self.server_args)))
        if self.faults:
            logger.warning("%s is set: fault injection armed (%s); never in production", FAULT_INJECT_ENV, self.faults)
        await self._grpc.start()
        logger.info("listening on %s:%d; health NOT_SERVING until the model is loaded and warmed up",
                    self.server_args.host, port)
        try:
            self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args,
                                               self.server_args.engine_process, self.server_args.log_format)
        except Exception:
            logger.exception("loading the model failed")
            await self._grpc.stop(None)
            return 1
        self.llm.faults = self.faults
        self.llm.stream_interval = self.server_args.stream_interval
        self.llm.start(on_dead=self._on_engine_dead)
        logger.info("engine: %s", json.dumps(engine_summary(self.llm)))
        started = time.monotonic()
        await warm_up(self.llm)
        if self.llm.dead_reason:
            logger.error("warm-up failed: %s", self.llm.dead_reason)
            await self._grpc.stop(None)
            return 1
        logger.info("warm-up done in %.2f s", time.monotonic() - started)
        # Attached after the warm-up so that it is not counted.
        self.llm.on_request_end = self._on_request_end
        metrics_http = self._start_metrics()
        self.servicer.attach(self.llm)
        if not self._stop.is_set():
            await self._set_health(_SERVING)
            logger.info("serving sluice.v1.Generation on %s:%d", self.server_args.host, port)
        await self._stop.wait()
        await self.drain()
        if metrics_http is not None:
            metrics_http.shutdown()
        return self._exit_code

    def _start_metrics(self) -> object | None:
        """Serve /metrics and keep its engine snapshot fresh; None when metrics_port is 0."""
        args = self.server_args
        if args.metrics_port == 0:
            return None
        http = self.metrics.serve_http(args.host, args.metrics_port)
        self._load_poller = asyncio.ensure_future(self._poll_load())
        logger.info("metrics on http://%s:%d/metrics", args.host, args.metrics_port)
        return http

    async def _poll_load(self) -> None:
        assert self.llm is not None
        while True:
            try:
                self.metrics.set_load(await self.llm.get_load())
            except EngineUnavailableError:  # stopped or failed: the last snapshot stays
                return
            await asyncio.sleep(LOAD_POLL_INTERVAL_S)

    def _on_request_end(self, stream: RequestStream, last: RequestOutput | None) -> None:
        reason = "abort"
        if last is not None:
            reason = next((c.finish_reason for c in reversed(last.outputs) if c.finish_reason), "abort")
        self.metrics.record(FinishedRequest(
            request_id=stream.request_id, finish_reason=reason, prompt_tokens=len(stream.prompt_token_ids),
            generation_tokens=sum(stream.num_output_tokens), metrics=last.metrics if last else None,
            ended_at=time.monotonic()))

    def _bind(self, address: str) -> int:
        """Listen on ``address`` with TLS when a certificate is given, else in plaintext."""
        args = self.server_args
        logger.info("API keys: %s", f"{len(self.auth.tenants)} tenants" if self.auth else "off (no authentication)")
        if args.tls_cert is None or args.tls_key is None:
            if not is_loopback(args.host):
                logger.warning("serving PLAINTEXT on non-loopback address %s: traffic and API keys can be "
                               "read on the network; give --tls-cert and --tls-key", args.host)
            return self._grpc.add_insecure_port(address)
        client_ca = _read(args.tls_client_ca) if args.tls_client_ca else None
        credentials = grpc.ssl_server_credentials([(_read(args.tls_key), _read(args.tls_cert))],
                                                  root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        logger.info("TLS on; client certificates %s", "required" if client_ca else "not required")
        return self._grpc.add_secure_port(address, credentials)

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
        logger.error("engine failed (%s): health NOT_SERVING, new requests UNAVAILABLE; exiting in %.1f s "
                     "with code 1", reason, FAILED_HEALTH_WINDOW_S)
        self._exit_code = 1
        asyncio.ensure_future(self._stop_after_failure())

    async def _stop_after_failure(self) -> None:
        await self._set_health(_NOT_SERVING)
        await asyncio.sleep(FAILED_HEALTH_WINDOW_S)
        self._stop.set()


def grpc_options(args: ServerArgs) -> list[tuple[str, int]]:
    """The gRPC core channel arguments that carry the server's limits."""
    return [
        ("grpc.max_receive_message_length", args.max_message_bytes),
        ("grpc.max_send_message_length", args.max_message_bytes),
        ("grpc.max_concurrent_streams", args.max_concurrent_streams),
        ("grpc.keepalive_time_ms", round(args.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(args.keepalive_timeout_s * 1000)),
        # While a stream sends, keepalive pings give way to flow-control pings; this bounds their
        # wait for an answer too, so a frozen client is found mid-stream (default: 60 s).
        ("grpc.http2.ping_timeout_ms", round(args.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(args.keepalive_permit_without_calls)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", round(args.keepalive_min_ping_interval_s * 1000)),
    ]


def limits(args: ServerArgs) -> dict[str, object]:
    """The limits in force, for the start-up log."""
    return {
        "max_message_bytes": args.max_message_bytes,
        "max_prompt_tokens": args.max_prompt_tokens or "the model's context",
        "max_n": args.max_n,
        "max_concurrent_streams": args.max_concurrent_streams,
        "keepalive_time_s": args.keepalive_time_s,
        "keepalive_timeout_s": args.keepalive_timeout_s,
        "keepalive_permit_without_calls": args.keepalive_permit_without_calls,
        "keepalive_min_ping_interval_s": args.keepalive_min_ping_interval_s,
    }


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def warm_up(llm: AsyncLLM) -> None:
    """One tiny greedy generate through the whole path, so the first client is not the one who
    pays for lazy initialisation."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    async for _ in llm.generate("sluice-warm-up", "Hello", params):
        pass


def engine_summary(llm: AsyncLLM) -> dict[str, object]:
    config = llm.info.model_config
    return {
        "model": config.name,
        "architecture": config.architecture,
        "dtype": str(config.dtype).removeprefix("torch."),
        "max_model_len": config.max_model_len,
        "vocab_size": llm.info.vocab_size,
        **llm.info.cache_info,
    }


def serve(engine_args: EngineArgs, server_args: ServerArgs) -> int:
    """Run the server in a fresh event loop; returns the exit code."""
    logger.info("engine args: %s", json.dumps(dataclasses.asdict(engine_args)))
    logger.info("server args: %s", json.dumps(dataclasses.asdict(server_args)))
    sys.setswitchinterval(server_args.gil_switch_interval_ms / 1000)
    return asyncio.run(Server(engine_args, server_args).run())
