"""Engine configuration: one frozen dataclass built from vLLM-named arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineArgs:
    """Everything that configures an engine. Field names follow vLLM's engine arguments, so the
    CLI flags are the same (``max_num_seqs`` <-> ``--max-num-seqs``)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    seed: int = 0
    quantization: str | None = None  # "awq" forces AWQ; unset: the checkpoint's config decides
    load_format: str = "auto"  # auto: the checkpoint's safetensors; dummy: random weights (benchmarks)
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # fixed number of KV blocks; default: from memory
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0  # KV budget on CPU when num_kv_blocks is not set
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_logprobs: int = 20
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"  # or "xxhash" (faster, not cryptographic) when installed
    attention_backend: str = "auto"  # auto | flash_attn | triton | torch
    # Schedule step N+1 and process step N's outputs while the device runs: the host's work hides
    # behind the device's. Requests that need logprobs, penalties, min_tokens or a seed run
    # synchronously (the engine drains the step in flight first).
    async_scheduling: bool = False
    enforce_eager: bool = False  # never use CUDA graphs (they replay decode steps on CUDA)
    max_cuda_graph_batch_size: int | None = None  # largest captured decode batch; default max_num_seqs
    max_waiting_requests: int | None = None  # bound on the waiting queue (None: unbounded)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ("auto", "flash_attn", "triton", "torch"):
            raise ValueError(
                f"attention_backend must be one of auto, flash_attn, triton, torch; got {self.attention_backend!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16; got {self.dtype!r}")

    def replace(self, **changes: object) -> EngineArgs:
        return dataclasses.replace(self, **changes)
