"""Load through a real ``sluice serve`` process (bench/bench_load.py with 50 clients for 8 s on the
tiny model): nothing lost or hung, the server's own counts agree with the clients', memory stays
bounded, the server ends idle; then SIGTERM in the middle of load drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from bench.bench_load import COMPLETED, REFUSED, LoadReport, LoadSettings, run_load
from bench.common import write_result
from tests.service_fixtures import (
    ServerProcess,
    free_port,
    health_until_exit,
    scrape_metrics,
    start_server,
    wait_until_serving,
)

NUM_KV_BLOCKS = 600
# The server's memory may grow by caches warming up under load; a leak per request would pass it.
RSS_GROWTH_BOUND_MIB = 128


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory, service_model: Path):
    metrics_port = free_port()
    srv = start_server(service_model, tmp_path_factory.mktemp("load-server"), "--num-kv-blocks", str(NUM_KV_BLOCKS),
                       "--metrics-port", str(metrics_port), "--shutdown-timeout", "60")
    try:
        wait_until_serving(srv)
        yield srv, metrics_port
    finally:
        srv.stop()


def test_50_clients_for_8_s_lose_nothing_and_leave_the_server_idle(load_server: tuple[ServerProcess, int],
                                                                    tmp_path: Path) -> None:
    srv, metrics_port = load_server
    settings = LoadSettings(clients=50, duration_s=8.0, connections=4, min_tokens=8, max_tokens=48,
                            request_timeout_s=90.0)
    report = asyncio.run(asyncio.wait_for(run_load(srv.address, settings, srv.proc.pid), 180))
    summary = report.summary()
    print(json.dumps(summary, indent=1))

    assert (summary["lost"], summary["hung"]) == (0, 0)
    assert summary["outcomes"] == {COMPLETED: len(report.records)}, summary["outcomes"]
    assert summary["usage_mismatches"] == 0  # every token the final message counted was streamed
    # Every client got at least one request through, and all ran together.
    assert len(report.records) >= settings.clients
    assert all(0 < r.first_token - r.start <= r.end - r.start for r in report.records)
    # Afterwards nothing runs or waits and every KV block is free (cached prefix blocks count as free).
    assert report.idle_after_s is not None, report.load_after
    assert report.load_after["kv_blocks_used"] == 0
    assert report.load_after["kv_blocks_total"] == NUM_KV_BLOCKS - 1
    assert report.load_after["prefix_cache_hit_rate"] > 0  # the clients' shared prompt prefixes were cached
    rss = report.rss_mib
    assert rss["after"] - rss["before"] < RSS_GROWTH_BOUND_MIB, rss
    # The server counted exactly the requests the clients saw finish, and aborted none.
    metrics = scrape_metrics(metrics_port)
    finished = sum(metrics.get(f"sluice:request_success_total{{finished_reason={r}}}", 0) for r in ("stop", "length"))
    assert finished == len(report.records)
    assert metrics.get("sluice:request_success_total{finished_reason=abort}", 0) == 0
    assert metrics["sluice:generation_tokens_total"] == summary["output_tokens"]

    out = tmp_path / "load.json"
    write_result(out, {"benchmark": "load", "results": summary})
    written = json.loads(out.read_text())["results"]
    assert written["latency_s"]["ttft"]["p50"] <= written["latency_s"]["ttft"]["p99"]
    assert written["output_tokens_per_s"] > 0


def test_sigterm_during_load_finishes_in_flight_requests_and_exits_0(load_server: tuple[ServerProcess, int]) -> None:
    srv, _ = load_server
    settings = LoadSettings(clients=20, duration_s=6.0, connections=2, min_tokens=16, max_tokens=64,
                            request_timeout_s=60.0)
    reports: list[LoadReport] = []
    clients = threading.Thread(target=lambda: reports.append(
        asyncio.run(asyncio.wait_for(run_load(srv.address, settings, check_idle=False), 120))))
    clients.start()
    time.sleep(2.0)
    sigterm_at = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    statuses = health_until_exit(srv, timeout=60)
    assert srv.proc.wait(60) == 0
    clients.join(120)
    assert not clients.is_alive() and reports

    report = reports[0]
    summary = report.summary()
    print(json.dumps(summary["outcomes"]), statuses)
    # Probes see NOT_SERVING (after SERVING, if they asked before the signal landed) before the port closes.
    assert "NOT_SERVING" in statuses and set(statuses[:statuses.index("NOT_SERVING")]) <= {"SERVING"}, statuses
    assert (summary["lost"], summary["hung"]) == (0, 0)
    # Accepted requests all finish normally; the rest are refused after SIGTERM: UNAVAILABLE, or
    # CANCELLED by gRPC itself for a call that reaches the server in the instant its port closes.
    allowed = {COMPLETED, f"{REFUSED}:UNAVAILABLE", f"{REFUSED}:CANCELLED"}
    assert set(summary["outcomes"]) <= allowed, summary["outcomes"]
    sigterm = sigterm_at - report.began
    refused = [r for r in report.records if r.outcome == REFUSED]
    assert refused and all(r.end >= sigterm for r in refused)
    drained = [r for r in report.records if r.outcome == COMPLETED and r.start < sigterm < r.end]
    assert drained, "no request was in flight at SIGTERM: the load was too light"
    assert "draining" in srv.log()
