"""The engine loop's periodic stats line (service/engine_core.py): where its time went and the
engine's load, every interval while it steps, and never with the interval at 0."""

from __future__ import annotations

import logging

import pytest

from engine.config import EngineArgs
from service.engine_core import LOG_STATS_INTERVAL_S, LoopStats, log_stats_interval, run_engine_loop

LOAD = {"num_running": 3, "num_waiting": 1, "kv_blocks_used": 25, "kv_blocks_total": 100,
        "generation_tokens_per_s": 123.4, "prefix_cache_hit_rate": 0.5}


class _FakeEngine:
    def __init__(self, steps: int) -> None:
        self.left = steps

    def has_unfinished_requests(self) -> bool:
        return self.left > 0

    def step(self) -> list:
        self.left -= 1
        return []

    def get_load(self) -> dict:
        return LOAD


def test_report_splits_the_interval_and_starts_a_new_one() -> None:
    stats = LoopStats(10.0, now=100.0)
    for _ in range(4):
        stats.add(calls_s=0.001, step_s=0.008, deliver_s=0.002)
    assert stats.report(_FakeEngine(0), now=105.0) is None  # the interval has not passed
    line = stats.report(_FakeEngine(0), now=110.0)
    assert line == ("engine loop: 4 steps in 10.0 s, 11.00 ms a step (model step 8.00, outputs 2.00, calls 1.00), "
                    "waited 9.96 s; running 3, waiting 1; KV cache 25.0% used; generation 123.4 tok/s; "
                    "prefix cache hit rate 50.0%")
    assert stats.report(_FakeEngine(0), now=125.0) is None  # no step since the last report


@pytest.mark.parametrize(("interval", "lines"), [(1e-9, 3), (0.0, 0)])
def test_the_loop_logs_a_line_per_interval_while_it_steps(caplog, interval: float, lines: int) -> None:
    engine = _FakeEngine(steps=3)
    with caplog.at_level(logging.INFO, logger="service.engine_core"):
        run_engine_loop(engine, lambda block: ([], True), lambda *a: None, lambda outputs: None, interval)
    assert engine.left == 0
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine loop: ")]
    assert len(logged) == lines
    assert all(line.startswith("engine loop: 1 step in ") and "running 3, waiting 1" in line for line in logged)


def test_disable_log_stats_turns_the_interval_off_and_the_environment_sets_it(monkeypatch) -> None:
    monkeypatch.delenv("SLUICE_LOG_STATS_INTERVAL", raising=False)
    assert log_stats_interval(EngineArgs(model="m")) == LOG_STATS_INTERVAL_S
    assert log_stats_interval(EngineArgs(model="m", disable_log_stats=True)) == 0.0
    assert log_stats_interval(None) == 0.0
    monkeypatch.setenv("SLUICE_LOG_STATS_INTERVAL", "0.5")
    assert log_stats_interval(EngineArgs(model="m")) == 0.5
    assert log_stats_interval(EngineArgs(model="m", disable_log_stats=True)) == 0.0
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("SLUICE_LOG_STATS_INTERVAL", bad)
        with pytest.raises(ValueError, match="SLUICE_LOG_STATS_INTERVAL"):
            log_stats_interval(EngineArgs(model="m"))
