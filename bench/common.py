"""Shared pieces of the benchmarks: model directories of real shapes, and result files.

A shape directory holds a ``config.json`` and a small byte-level tokenizer; the engine runs it
with ``load_format="dummy"`` (random weights): speed does not depend on the weights' values.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# name -> (transformers config class, its arguments); see ../shared/gpu/README.md for the two real ones.
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_theta=1000000.0)),
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_theta=500000.0)),
    # Small enough for a 2-core CPU.
    "cpu-small": ("LlamaConfig", dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=4096)),
}


# The AutoAWQ GEMM config a quantized checkpoint of a shape carries (``write_shape_dir(awq=True)``).
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def write_shape_dir(shape: str, out_dir: Path, awq: bool = False) -> Path:
    """Write ``config.json`` and a tokenizer for ``shape`` into ``out_dir``; with ``awq`` the
    config says AWQ 4-bit (dummy weights then fill the packed tensors)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cls_name, kwargs = SHAPES[shape]
    config = getattr(transformers, cls_name)(**kwargs, bos_token_id=0, eos_token_id=1)
    config.architectures = [cls_name.replace("Config", "ForCausalLM")]
    if awq:
        config.quantization_config = dict(AWQ_CONFIG)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["sluice benchmark tokenizer"], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return out_dir


GPU_STATE_FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.mem", "temperature.gpu", "power.draw")
# Newer drivers name the throttle reasons clocks_event_reasons, older ones clocks_throttle_reasons.
GPU_EVENT_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


def gpu_state() -> list[dict[str, str]] | None:
    """Each GPU's clocks, temperature, power and active clock-limiting reasons as ``nvidia-smi``
    reports them when the result is written (the same benchmark on the same kind of H200 has read
    up to 8% apart from one machine lease to the next), or None without ``nvidia-smi``."""
    for fields in [GPU_STATE_FIELDS + (event,) for event in GPU_EVENT_FIELDS] + [GPU_STATE_FIELDS]:
        try:
            done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        rows = [[v.strip() for v in line.split(",")] for line in done.stdout.strip().splitlines()]
        if done.returncode == 0 and rows and all(len(row) == len(fields) for row in rows):
            return [dict(zip(fields, row)) for row in rows]
    return None


def environment() -> dict[str, object]:
    """Date, commit, device and package versions, for every result file."""
    here = Path(__file__).parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
        commit = done.stdout.strip() if done.returncode == 0 else None
        # Tracked files changed since that commit: the figures are of a tree no commit holds yet.
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, cwd=here)
        modified = {0: False, 1: True}.get(diff.returncode)
    except OSError:
        commit, modified = None, None
    commit = os.environ.get("SLUICE_COMMIT", commit)  # the GPU machine gets a tree without git metadata
    versions = {}
    for pkg in ("torch", "triton", "transformers", "grpcio", "protobuf"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "tree_modified": modified,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "gpu_state": gpu_state() if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "packages": versions,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "engine": _engine_dir(),
    }


def _engine_dir() -> str | None:
    """Where the ``engine`` package that ran was imported from (relative to this tree when inside
    it): an A/B against another copy (bench/with_engine.py) says which side a file is."""
    engine = sys.modules.get("engine")
    if engine is None or engine.__file__ is None:
        return None
    path = Path(engine.__file__).resolve().parent
    root = Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **result}, indent=2) + "\n")
    print(f"wrote {path}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@contextlib.contextmanager
def recorded_host_waits() -> Iterator[list[tuple[int, float, float]]]:
    """Inside, every ``PendingOutput.result`` (the asynchronous engine's wait for a step's sampled
    tokens) appends ``(requests, seconds it blocked, perf_counter when it began)`` to the list
    yielded; about no wait means the host, not the device, set the pace."""
    from engine.model_runner import PendingOutput

    waits: list[tuple[int, float, float]] = []
    unpatched = PendingOutput.result

    def timed_result(self: PendingOutput):
        start = time.perf_counter()
        out = unpatched(self)
        waits.append((len(self.request_ids), time.perf_counter() - start, start))
        return out

    PendingOutput.result = timed_result
    try:
        yield waits
    finally:
        PendingOutput.result = unpatched


def timed_single_stream(engine, runs: int) -> list[tuple[float, float]]:
    """``(ms a step, ms a step the host waited for the device)`` of ``runs`` greedy streams of one
    request (a 128-token prompt, 256 new tokens, the prompt's step not counted) after one
    warm-up run (the wait: ``recorded_host_waits``)."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    results = []
    with recorded_host_waits() as waits:
        for run in range(runs + 1):
            engine.add_request(f"single-{run}", list(range(2, 130)), params)
            engine.step()  # the prompt
            sync()
            waits.clear()
            steps, start = 0, time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            sync()
            if run:
                results.append((1000 * (time.perf_counter() - start) / steps,
                                1000 * sum(wait for _, wait, _ in waits) / steps))
            engine.reset_prefix_cache()
    return results
