"""Engine configuration: one frozen dataclass built from vLLM-named arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

# The bundled draft of the bundled model, found in the source tree like the CLI's default model.
DEFAULT_DRAFT_MODEL = Path(__file__).resolve().parent.parent / "models" / "sluice-pycoder-draft"
SPECULATIVE_METHODS = ("ngram", "draft")


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
    # On a CPU in float32: linears with weights packed once, fp16-storable ones (AWQ, bf16 checkpoints)
    # for sluice's own kernel, the rest for oneDNN (both batch-invariant). engine/layers/cpu_linear.py.
    # The packed copy replaces an AWQ layer's dequantized weight; a dense layer keeps its fp32
    # weight beside it (x1.5 its memory in fp16, x2 in fp32). Through `sluice serve` on the bundled
    # model: one stream 45 -> 64-80 tok/s, 8 streams 142-153 -> 357-382 (docs/benchmarks.md).
    cpu_onednn_linear: bool = True
    max_cuda_graph_batch_size: int | None = None  # largest captured decode batch; default max_num_seqs
    # Steps of one request with up to this many new tokens (a short prompt at low load) replay a
    # CUDA graph padded to the next power of two (engine/cuda_graph.py); 0: such steps run eagerly.
    max_cuda_graph_prefill_tokens: int = 512
    max_waiting_requests: int | None = None  # bound on the waiting queue (None: unbounded)
    # The server's engine loop logs its load and where its time went every LOG_STATS_INTERVAL_S
    # while requests run (service/engine_core.py); this turns that off.
    disable_log_stats: bool = False
    # Speculative decoding (off unless a method or a draft model is given).
    speculative_model: str | None = None  # draft model path; "default": the bundled sluice-pycoder-draft
    speculative_method: str | None = None  # ngram | draft (implied by speculative_model)
    num_speculative_tokens: int = 4  # k: drafts verified per step
    # Suffix n-grams of 1..16 tokens: with n-gram's own pause rule (engine/spec_decode/policy.py)
    # bench/results/spec_decode_cpu_ngram_policy*.json (bundled model, k = 4) gave 1.69-1.85x
    # (three runs) on input-grounded prompts and 1.71-1.78x on held-out code, against 1.68-1.72x
    # and 1.63-1.67x for 2..16: single-token matches fail more often, but a failed n-gram verify
    # costs only a verify step's extra positions.
    ngram_prompt_lookup_min: int = 1
    ngram_prompt_lookup_max: int = 16
    # A draft model stops drafting for a request after a draft its own distribution gives less
    # than this probability (that draft is still verified): the later ones would mostly be
    # rejected, and each costs a draft forward and a verified position. 0: always k drafts.
    # bench/results/spec_decode_cpu_draft_confidence{,_b}.json (bundled pair, CPU, k = 4, held-out
    # code): 1.27x at 0, 1.30-1.41x at 0.2-0.5, best at 0.3 (1.41x, 1.33x on a second run); with
    # the TorchScript draft forward 1.58x at 0.3 against 1.49x at 0 (spec_decode_cpu_draft_torchscript.json).
    draft_confidence_threshold: float = 0.3
    # No drafts while more requests than this run. bench/results/spec_decode_h200.json: on an H200
    # (8B shape) a verify step costs 1.27x a decode step at batch 1 and 1.98x at 32, so drafts
    # giving a mean accepted length of 2 stop paying near 32 (docs/benchmarks.md).
    speculative_disable_batch_size: int | None = 32

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_cuda_graph_prefill_tokens < 0:
            raise ValueError(f"max_cuda_graph_prefill_tokens must be >= 0, got {self.max_cuda_graph_prefill_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ("auto", "flash_attn", "triton", "torch"):
            raise ValueError(
                f"attention_backend must be one of auto, flash_attn, triton, torch; got {self.attention_backend!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16; got {self.dtype!r}")
        self._check_speculative()

    @property
    def speculative(self) -> bool:
        return self.speculative_method is not None

    def _check_speculative(self) -> None:
        if self.speculative_model == "default":
            object.__setattr__(self, "speculative_model", str(DEFAULT_DRAFT_MODEL))
        method = self.speculative_method
        if method is None and self.speculative_model is not None:
            object.__setattr__(self, "speculative_method", method := "draft")
        if method is not None and method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}; got {method!r}")
        if method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method='draft' needs speculative_model (a path, or 'default')")
        if method == "ngram" and self.speculative_model is not None:
            raise ValueError("speculative_model is for speculative_method='draft', not 'ngram'")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max:
            raise ValueError(
                f"need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max, got "
                f"{self.ngram_prompt_lookup_min} and {self.ngram_prompt_lookup_max}")
        if not 0.0 <= self.draft_confidence_threshold < 1.0:
            raise ValueError(f"draft_confidence_threshold must be in [0, 1), got {self.draft_confidence_threshold}")
        if self.speculative_disable_batch_size is not None and self.speculative_disable_batch_size < 1:
            raise ValueError(f"speculative_disable_batch_size must be >= 1, got {self.speculative_disable_batch_size}")

    def replace(self, **changes: object) -> EngineArgs:
        return dataclasses.replace(self, **changes)
