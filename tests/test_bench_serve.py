"""The serving benchmark: its latency arithmetic on a hand-made timeline, its Poisson arrivals,
and whole runs against real ``sluice serve`` processes on loopback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from bench import bench_serve
from bench.bench_serve import arrival_offsets, record_of, sample_workload, summarize
from sluice.v1 import generation_pb2 as pb
from tests.service_fixtures import ServerProcess

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def test_record_and_summary_arithmetic_on_a_hand_made_timeline() -> None:
    # Sent at 100.0; messages of 1, 2, 0, 1, 1 tokens, then the final (empty) one.
    first = record_of(100.0, [(100.25, 1), (100.5, 2), (100.75, 0), (101.0, 1), (101.5, 1), (101.5, 0)],
                      prompt_tokens=10, max_tokens=5)
    assert (first.ttft, first.e2e, first.output_tokens) == (0.25, 1.5, 5)
    assert first.itl == [0.25, 0.5, 0.5]  # one gap per message with tokens; the empty one has none
    assert first.tpot == pytest.approx((1.5 - 0.25) / 4)
    short = record_of(0.0, [(0.5, 1), (0.625, 1), (0.625, 0)], prompt_tokens=6, max_tokens=3,
                      usage=pb.Usage(time_to_first_token_seconds=0.375, queue_wait_seconds=0.125))
    assert (short.server_ttft, short.server_queue_wait) == (0.375, 0.125)
    assert math.isnan(first.server_ttft)  # no usage: not counted below
    failed = record_of(0.0, [], prompt_tokens=9, max_tokens=4, error="UNAVAILABLE: draining")
    assert failed.error == "UNAVAILABLE: draining" and failed.tpot is None
    assert record_of(0.0, [(0.5, 0)], 3, 4).error == "no tokens"

    report = summarize([first, short, failed], duration=2.0)
    assert (report["completed"], report["failed"], report["length_mismatches"]) == (2, 1, 1)
    assert report["errors"] == ["UNAVAILABLE: draining"]
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (16, 7)
    assert report["request_throughput"] == pytest.approx(1.0)
    assert report["output_token_throughput"] == pytest.approx(3.5)
    assert report["total_token_throughput"] == pytest.approx(11.5)
    # By hand: p-th percentile interpolates linearly at rank (n - 1) * p / 100 of the sorted values.
    expected = {
        "ttft_ms": (375.0, 375.0, 250 + 0.99 * 250),
        "tpot_ms": (218.75, 218.75, 125 + 0.99 * 187.5),
        "itl_ms": (343.75, 375.0, 500.0),  # gaps 0.25, 0.5, 0.5 and 0.125 s
        "e2e_ms": (1062.5, 1062.5, 625 + 0.99 * 875),
    }
    for metric, (mean, p50, p99) in expected.items():
        assert report[metric] == pytest.approx({"mean": mean, "p50": p50, "p99": p99}), metric
    assert report["server_ttft_ms"] == pytest.approx({"mean": 375.0, "p50": 375.0, "p99": 375.0})
    assert report["server_queue_wait_ms"] == pytest.approx({"mean": 125.0, "p50": 125.0, "p99": 125.0})


def test_arrivals_are_a_seeded_poisson_process() -> None:
    rate = 8.0
    offsets = arrival_offsets(4000, rate, seed=3)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and min(gaps) >= 0.0
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 1e-3
    assert offsets == arrival_offsets(4000, rate, seed=3)
    assert arrival_offsets(5, math.inf, seed=3) == [0.0] * 5


def _check_run(run: dict, workload: list[tuple[list[int], int]]) -> None:
    assert (run["completed"], run["failed"], run["length_mismatches"]) == (len(workload), 0, 0), run["errors"]
    assert run["total_output_tokens"] == sum(max_tokens for _, max_tokens in workload)
    assert run["total_input_tokens"] == sum(len(prompt) for prompt, _ in workload)
    assert run["output_token_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration_s"])
    assert run["request_throughput"] == pytest.approx(run["completed"] / run["duration_s"])
    for metric in LATENCIES:
        assert 0 < run[metric]["p50"] <= run[metric]["p99"], metric
    assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
    # The server times from its acceptance, after the client sent, and before the token's trip back.
    assert 0 < run["server_queue_wait_ms"]["p50"] <= run["server_ttft_ms"]["p50"] <= run["ttft_ms"]["p50"]


def test_benchmark_starts_a_server_and_reports_every_rate(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server shares the two cores with the tests
    out = tmp_path / "serve.json"
    argv = ["--shape", "cpu-small", "--num-prompts", "6", "--input-len-range", "4", "16",
            "--output-len-range", "4", "8", "--request-rate", "inf", "10", "--seed", "7", "--out", str(out),
            "--server-stats-interval", "0.05",
            "--block-size", "8", "--num-kv-blocks", "64", "--max-model-len", "64"]  # the last 6 go to sluice serve
    result = bench_serve.main(argv)
    # The engine loop's stats lines from the server's log, every 0.05 s while it stepped.
    assert result["server_stats"] and all(line.startswith("engine loop: ") for line in result["server_stats"])

    workload = sample_workload(6, (4, 16), (4, 8), result["model_info"]["vocab_size"], seed=7)
    assert [run["request_rate"] for run in result["runs"]] == ["inf", 10.0]
    for run in result["runs"]:
        _check_run(run, workload)
    # Open loop: the finite-rate run lasts at least until its last request was sent.
    assert result["runs"][1]["duration_s"] >= arrival_offsets(6, 10.0, seed=7)[-1]
    assert (result["model_info"]["block_size"], result["model_info"]["max_model_len"]) == (8, 64)
    assert result["settings"]["server_flags"] == argv[-6:]

    written = json.loads(out.read_text())
    assert {"environment", "settings", "server_command", "model_info", "runs", "server_stats"} <= written.keys()
    assert written["runs"] == result["runs"]
    assert written["model_info"]["attention_backend"] == "torch"
    assert written["settings"]["request_rate"] == ["inf", 10.0]


def test_max_concurrency_one_sends_requests_one_after_another(server: ServerProcess) -> None:
    result = bench_serve.main(["--address", server.address, "--num-prompts", "4", "--input-len-range", "4", "8",
                               "--output-len-range", "4", "6", "--max-concurrency", "1"])
    run = result["runs"][0]
    workload = sample_workload(4, (4, 8), (4, 6), result["model_info"]["vocab_size"], seed=0)
    _check_run(run, workload)
    # Requests that never overlap fit their latencies end to end inside the run.
    assert run["e2e_ms"]["mean"] * run["completed"] <= 1000 * run["duration_s"]


def test_refuses_requests_longer_than_the_server_context(server: ServerProcess) -> None:
    with pytest.raises(SystemExit, match="max_model_len"):
        bench_serve.main(["--address", server.address, "--num-prompts", "2", "--output-len-range", "5000", "6000"])


def test_server_flags_need_a_server_started_here() -> None:
    with pytest.raises(SystemExit):
        bench_serve.parse_args(["--address", "127.0.0.1:1", "--max-num-seqs", "8"])
    args, flags = bench_serve.parse_args(["--request-rate", "inf", "4", "--enforce-eager", "--seed", "2",
                                          "--server-arg=--seed=5"])
    assert args.request_rate == [math.inf, 4.0] and args.seed == 2
    assert flags == ["--enforce-eager", "--seed=5"]
