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


def test_chain_shares_split_a_pdl_timeline_into_extension_idle_and_lead() -> None:
    """Three ops: the second placed early (starts 2 us before the first ends), the third after
    1 us of idle device. The extensions and idle times add up to the span."""
    from bench.profile_step import chain_shares

    ops = [("a", 0.0, 10.0), ("b", 8.0, 13.0), ("c", 14.0, 20.0)]
    assert chain_shares(ops) == [(10.0, 0.0, 0.0), (3.0, 0.0, 2.0), (6.0, 1.0, 0.0)]
    # An op that ends inside another's span extends nothing.
    assert chain_shares([("a", 0.0, 10.0), ("b", 1.0, 5.0), ("c", 6.0, 12.0)])[1:] == [(0.0, 0.0, 9.0), (2.0, 0.0, 4.0)]
    assert sum(e + i for e, i, _ in chain_shares(ops)) == 20.0


def test_chain_table_numbers_ops_by_their_place_in_a_layer() -> None:
    """Two steps of: a copy, three layers of (norm, linear, act), a head. Each layer's norm
    extends the timeline 1 us, its linear 4 (placed 1 us early), its act 2; the head 5, the copy
    1, the second step's after 3 us of idle device (the timeline begins at the first op)."""
    from bench.profile_step import chain_table, layer_period

    ops, t = [], 0.0
    for _ in range(2):
        t += 3.0
        ops.append(("copy", t, t + 1.0))
        t += 1.0
        for _ in range(3):
            ops.append(("norm", t, t + 1.0))
            ops.append(("linear", t, t + 5.0))  # placed while the norm runs
            ops.append(("act", t + 5.0, t + 7.0))
            t += 7.0
        ops.append(("head", t, t + 5.0))
        t += 5.0
    names = [name for name, _, _ in ops]
    assert layer_period(names) == 3
    table = chain_table(ops, steps=2)
    rows = {line.split()[-1]: line.split() for line in table.splitlines()[2:]}
    # place, n/step, extends us/step, idle us/step, mean us, lead us
    assert rows["norm"][:4] == ["0", "3.0", "3.0", "0.0"]
    assert rows["linear"][:6] == ["1", "3.0", "12.0", "0.0", "5.00", "1.00"]
    assert rows["act"][:4] == ["2", "3.0", "6.0", "0.0"]
    assert rows["head"][:3] == ["-1", "1.0", "5.0"]
    assert rows["copy"][:4] == ["-1", "1.0", "1.0", "1.5"]
    assert table.splitlines()[0].startswith("decode timeline: 28.5 us a step over 2 steps, a layer 3 ops")


def test_bench_offline_single_stream_records_the_host_wait_with_async_scheduling(tiny_models) -> None:
    """Each single-stream run carries the host's wait for the device a token after the first
    (part of the time a token) with asynchronous scheduling, none without it, and
    PendingOutput.result is itself again afterwards."""
    import argparse

    from bench.bench_offline import single_stream
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine
    from engine.model_runner import PendingOutput

    original = PendingOutput.result
    args = argparse.Namespace(seed=0, single_prompt_tokens=16, single_new_tokens=24, single_repeats=2)
    for async_scheduling in (True, False):
        engine = LLMEngine(EngineArgs(model=str(tiny_models["llama"]), num_kv_blocks=64, block_size=16,
                                      async_scheduling=async_scheduling))
        result = single_stream(engine, args)
        assert len(result["runs"]) == 2 and all(run["output_tokens"] == 24 for run in result["runs"])
        if async_scheduling:
            assert all(0 <= run["host_wait_ms_per_token"] <= run["decode_ms_per_token"] for run in result["runs"])
        else:
            assert not any("host_wait_ms_per_token" in run for run in result["runs"])
        assert PendingOutput.result is original


def test_with_engine_runs_a_module_against_another_engine_copy(tmp_path: Path) -> None:
    """bench/with_engine.py imports ``engine`` from the given copy (not from this tree, which
    ``python -m`` would put first) and result files name the engine that ran."""
    import subprocess
    import sys

    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("MARK = 'the copy'\n")
    (tmp_path / "probe.py").write_text(
        "import sys, engine\nfrom bench.common import environment\n"
        "print(engine.MARK, environment()['engine'], sys.argv[1:])\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "bench/with_engine.py", str(tmp_path), "probe", "--x", "1"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"the copy {(tmp_path / 'engine').resolve()} ['--x', '1']"
    missing = subprocess.run([sys.executable, "bench/with_engine.py", str(tmp_path / "none"), "probe"], cwd=root,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "holds no engine/ package" in missing.stderr


def test_environment_names_the_engine_of_this_tree() -> None:
    import engine  # noqa: F401
    from bench.common import environment

    assert environment()["engine"] == "engine"
