"""The ``sluice`` command: flags built from the config dataclasses, offline and remote generate,
info and health against a real server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineArgs
from engine.sampling_params import SamplingParams
from service import cli
from service.server import ServerArgs
from tests.service_fixtures import MAX_N, NUM_KV_BLOCKS, REPO_ROOT, ServerProcess, free_port

PROMPT = "def parse(text):"


class _Terminal:
    """Records each write, to tell streamed output from output printed at the end."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_every_engine_and_server_field_is_a_flag() -> None:
    args = cli.build_parser().parse_args(["serve", "--model", "m"])
    for group, cls in (("engine", EngineArgs), ("server", ServerArgs)):
        for f in dataclasses.fields(cls):
            assert f"{group}.{f.name}" in vars(args), f"no --{f.name.replace('_', '-')} flag"
    # Unset flags keep the dataclasses' defaults.
    assert cli.engine_args_of(args) == EngineArgs(model="m")
    assert ServerArgs(**cli.flags_of(args, "server")) == ServerArgs()


def test_serve_flags_build_engine_and_server_args() -> None:
    args = cli.build_parser().parse_args(
        ["serve", "--model", "m", "--max-num-seqs", "3", "--max-model-len", "256",
         "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5", "--port", "6000",
         "--shutdown-timeout", "2.5"])
    assert cli.engine_args_of(args) == EngineArgs(
        model="m", max_num_seqs=3, max_model_len=256, enable_prefix_caching=False, gpu_memory_utilization=0.5)
    assert ServerArgs(**cli.flags_of(args, "server")) == ServerArgs(port=6000, shutdown_timeout=2.5)


def test_generate_offline_streams_the_engine_output(service_model: Path, oracle, monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    rc = cli.main(["generate", "--model", str(service_model), "--num-kv-blocks", str(NUM_KV_BLOCKS),
                   "--temperature", "0", "--max-tokens", "12", "--ignore-eos", PROMPT])
    expected = oracle.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert rc == 0
    assert "".join(terminal.writes) == expected.outputs[0].text + "\n"
    assert len([w for w in terminal.writes if w.strip()]) > 1, "the text was not streamed"


def test_generate_from_a_server_prints_the_same_text(server: ServerProcess, oracle, capsys) -> None:
    rc = cli.main(["generate", "--server", server.address, "--temperature", "0", "--max-tokens", "12",
                   "--stop", "\n\n", PROMPT])
    params = SamplingParams(temperature=0.0, max_tokens=12, stop=["\n\n"])
    assert rc == 0
    assert capsys.readouterr().out == oracle.generate(PROMPT, params)[0].outputs[0].text + "\n"


def test_generate_n_choices_prints_each(server: ServerProcess, oracle, capsys) -> None:
    rc = cli.main(["generate", "--server", server.address, "--n", "2", "--seed", "5", "--max-tokens", "6",
                   PROMPT])
    expected = oracle.generate(PROMPT, SamplingParams(n=2, seed=5, max_tokens=6))[0]
    assert rc == 0
    printed = "".join(f"--- choice {c.index} ---\n{c.text}\n" for c in expected.outputs)
    assert capsys.readouterr().out == printed


def test_info_describes_the_served_model(server: ServerProcess, capsys) -> None:
    assert cli.main(["info", "--server", server.address]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["architecture"] == "LlamaForCausalLM"
    assert (info["model"]["num_kv_blocks"], info["model"]["max_n"]) == (NUM_KV_BLOCKS, MAX_N)
    assert info["load"]["kv_blocks_total"] == NUM_KV_BLOCKS - 1


def test_health_command_exit_codes(server: ServerProcess) -> None:
    def health(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service.cli", "health", "--server", address,
                               "--timeout", "5"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    serving = health(server.address)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")
    nobody = health(f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 2 and nobody.stdout.startswith("UNREACHABLE")


def test_generate_from_a_server_reports_a_refused_request(server: ServerProcess) -> None:
    with pytest.raises(SystemExit, match="INVALID_ARGUMENT: temperature"):
        cli.main(["generate", "--server", server.address, "--temperature", "-1", PROMPT])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log-format", "xml"], "log_format"),
        (["--api-key-file", "/nonexistent/keys"], "/nonexistent/keys"),
    ],
)
def test_bad_serve_settings_exit_2_with_a_clear_message(flags: list[str], message: str, capsys) -> None:
    from service import cli

    assert cli.main(["serve", "--port", "0", *flags]) == 2
    assert message in capsys.readouterr().err
