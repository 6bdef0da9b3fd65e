"""Operations: Prometheus metrics and JSON logs of a real ``sluice serve``, and the JSON formatter."""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import SluiceClient, make_request
from service.log_format import JsonFormatter
from sluice.v1 import generation_pb2 as pb
from tests.service_fixtures import SERVICE_MODEL_LEN, ServerProcess, free_port, start_server, wait_until_serving

# Distinct words that must never reach the log.
SECRET_PROMPTS = ["zebra quartz violin", "mango nebula harp"]
ABORT_PROMPT = "walrus topaz cello"
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def ops_server(tmp_path_factory: pytest.TempPathFactory, service_model) -> tuple[ServerProcess, int]:
    metrics_port = free_port()
    srv = start_server(service_model, tmp_path_factory.mktemp("ops-logs"), "--num-kv-blocks", "300",
                       "--metrics-port", str(metrics_port), "--log-format", "json")
    try:
        wait_until_serving(srv)
        yield srv, metrics_port
    finally:
        srv.stop()


def _scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics, keyed by name plus its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def test_metrics_and_json_logs_match_the_requests_sent(ops_server: tuple[ServerProcess, int]) -> None:
    srv, metrics_port = ops_server
    before = _scrape(metrics_port)
    assert before.get("sluice:request_success_total{finished_reason=length}", 0) == 0
    prompt_tokens = 0
    ids = []
    with SluiceClient(srv.address, timeout=60) as client:
        for i, prompt in enumerate(SECRET_PROMPTS):
            request = make_request(prompt, request_id=f"ops-length-{i}", max_tokens=MAX_TOKENS, ignore_eos=True,
                                   temperature=0.0)
            last = list(client.generate(request))[-1]
            assert last.finish_reason == pb.FINISH_REASON_LENGTH
            prompt_tokens += last.usage.prompt_tokens
            ids.append(request.request_id)
        request = make_request(ABORT_PROMPT, request_id="ops-abort-0", max_tokens=SERVICE_MODEL_LEN - 64,
                               ignore_eos=True, temperature=0.0)
        deltas = client.generate(request)
        next(deltas)
        assert client.cancel(request.request_id) == [request.request_id]
        last = list(deltas)[-1]
        assert last.finish_reason == pb.FINISH_REASON_ABORTED
        prompt_tokens += last.usage.prompt_tokens
        aborted_tokens = last.usage.completion_tokens
        ids.append(request.request_id)

    deadline = time.monotonic() + 10
    while True:  # the engine gauges refresh on a timer; wait for the idle snapshot
        after = _scrape(metrics_port)
        if after["sluice:num_requests_running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert after["sluice:request_success_total{finished_reason=length}"] == 2
    assert after["sluice:request_success_total{finished_reason=abort}"] == 1
    assert after["sluice:prompt_tokens_total"] == prompt_tokens
    # The aborted request may have generated a token or two past what its stream reported.
    generated = after["sluice:generation_tokens_total"]
    assert 2 * MAX_TOKENS + aborted_tokens <= generated <= 2 * MAX_TOKENS + aborted_tokens + 8
    assert after["sluice:e2e_request_latency_seconds_count"] == 3
    assert after["sluice:time_to_first_token_seconds_count"] == 3
    assert after["sluice:request_queue_time_seconds_count"] == 3
    # Only requests with more than one token have a time per output token.
    assert after["sluice:time_per_output_token_seconds_count"] == 2 + (aborted_tokens > 1)
    assert 0 < after["sluice:e2e_request_latency_seconds_sum"] < 60
    assert after["sluice:num_requests_running"] == 0
    assert after["sluice:num_requests_waiting"] == 0
    assert 0 <= after["sluice:kv_cache_usage_perc"] <= 1
    assert after["sluice:prefix_cache_queries_total"] >= after["sluice:prefix_cache_hits_total"] >= 0
    assert after["sluice:prefix_cache_queries_total"] > 0

    srv.stop()
    log = srv.log()
    lines = [line for line in log.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for r in records:
        assert {"ts", "level", "logger", "message"} <= r.keys()
    finished = {r["request_id"]: r for r in records if "finish_reason" in r}
    assert set(ids) <= finished.keys()
    assert finished["ops-length-0"]["finish_reason"] == "length"
    assert finished["ops-length-0"]["generation_tokens"] == MAX_TOKENS
    assert finished["ops-abort-0"]["finish_reason"] == "abort"
    assert finished["ops-length-0"]["e2e_s"] >= finished["ops-length-0"]["ttft_s"] > 0
    for prompt in (*SECRET_PROMPTS, ABORT_PROMPT):
        for word in prompt.split():
            assert word not in log


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("sluice.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_one_object_with_fields() -> None:
    line = JsonFormatter().format(_record("done %s in %d ms", "ok", 12,
                                          fields={"request_id": "r-1", "e2e_s": 0.5, "message": "ignored"}))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "sluice.test"
    assert entry["message"] == "done ok in 12 ms"
    assert entry["request_id"] == "r-1"
    assert entry["e2e_s"] == 0.5
    assert entry["ts"].endswith("+00:00")
    assert set(entry) == {"ts", "level", "logger", "message", "request_id", "e2e_s"}


def test_json_formatter_keeps_tracebacks_on_one_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exc_info"]
