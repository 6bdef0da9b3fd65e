"""bench/common.py's record of the GPU's state, against a stand-in ``nvidia-smi`` on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bench.common import GPU_STATE_FIELDS, gpu_state


def _fake_smi(folder: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_gpu_state_falls_back_to_the_older_field_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that rejects clocks_event_reasons (older ones) is asked for clocks_throttle_reasons;
    one row per GPU."""
    _fake_smi(tmp_path, """case "$1" in
  *clocks_event_reasons*) echo 'Field "clocks_event_reasons.active" is not a valid field to query.'; exit 2;;
  *clocks_throttle_reasons*) echo '1980 MHz, 1980 MHz, 3201 MHz, 41, 112.34 W, 0x4'
                             echo '1755 MHz, 1980 MHz, 3201 MHz, 63, 690.02 W, 0x0';;
esac
""", monkeypatch)
    state = gpu_state()
    assert state is not None and len(state) == 2
    assert state[0] == dict(zip(GPU_STATE_FIELDS + ("clocks_throttle_reasons.active",),
                                ["1980 MHz", "1980 MHz", "3201 MHz", "41", "112.34 W", "0x4"]))
    assert state[1]["clocks.sm"] == "1755 MHz" and state[1]["power.draw"] == "690.02 W"


def test_gpu_state_without_nvidia_smi_or_with_a_failing_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9\n", monkeypatch)
    assert gpu_state() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_state() is None


def test_timed_single_stream_times_each_run_after_a_warm_up_and_unpatches(tiny_models) -> None:
    """One (ms a step, ms a step waited) pair per timed run, the wait part of the step, every
    stream run to its 256 tokens, and PendingOutput.result itself again afterwards."""
    from bench.common import timed_single_stream
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine
    from engine.model_runner import PendingOutput

    original = PendingOutput.result
    engine = LLMEngine(EngineArgs(model=str(tiny_models["llama"]), num_kv_blocks=64, block_size=16,
                                  async_scheduling=True))
    tokens: dict[str, int] = {}
    step = engine.step

    def counting_step():
        outputs = step()
        for out in outputs:
            tokens[out.request_id] = tokens.get(out.request_id, 0) + len(out.outputs[0].token_ids)
        return outputs

    engine.step = counting_step  # type: ignore[method-assign]
    results = timed_single_stream(engine, runs=2)
    assert len(results) == 2 and all(0 <= wait <= ms for ms, wait in results)
    assert tokens == {"single-0": 256, "single-1": 256, "single-2": 256}
    assert PendingOutput.result is original
