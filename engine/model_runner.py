"""Runs what the scheduler decided: one flattened forward over every scheduled token, then one
sampled token for each request whose chunk reaches its last token.

::

    scheduled:   req A: start 5, 3 new tokens      req B: start 0, 4 new tokens (prompt chunk)
    input_ids:   [a5 a6 a7 | b0 b1 b2 b3]          query_start_loc = [0, 3, 7]
    positions:   [ 5  6  7 |  0  1  2  3]          seq_lens        = [8, 4]
    slots:       block_table[pos // block_size] * block_size + pos % block_size
    sampled at:  the last token of each request with sample=True (index 2 and 6)

A verify step (a request with k draft tokens) is sampled at its last 1 + k tokens, and the
rejection sampler keeps the drafts the target accepts (engine/spec_decode/rejection_sampler.py);
steps without drafts take the plain sampler, as before speculation existed.

On CUDA, a step where every request decodes one token, or verifies k drafts with 1 + k tokens,
replays a CUDA graph captured for the next larger batch size (engine/cuda_graph.py), and a step
of one request with up to ``max_cuda_graph_prefill_tokens`` new tokens one captured for the next
larger token count; other steps run eagerly. Both read their inputs from the same persistent
buffers (engine/input_buffers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.attention.backend import select_attention_backend
from engine.attention.metadata import set_forward_context
from engine.config import EngineArgs
from engine.cuda_graph import StepGraphs, step_logits
from engine.host_copy import to_device
from engine.input_buffers import InputBuffers
from engine.kv_cache import (
    KVCaches,
    allocate_kv_cache,
    kv_block_bytes,
    num_blocks_from_cpu_budget,
    num_blocks_from_gpu_memory,
)
from engine.model_config import ModelConfig
from engine.model_loader import load_model
from engine.sampler import Sampler, SamplingRow
from engine.spec_decode.rejection_sampler import RejectionSampler
from scheduler.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingOutput:
    """A step's sampled tokens, not yet on the host: ``result()`` waits for them. On CUDA they
    travel to a pinned host tensor right behind the step's sampling, and ``ready`` marks the end
    of that copy: reading a device tensor instead would queue its copy behind whatever was
    launched since (the next step), and the host would wait for that step too."""

    request_ids: list[str]
    token_ids: torch.Tensor | None
    ready: torch.cuda.Event | None = None

    def result(self) -> RunnerOutput:
        if self.token_ids is None:
            return RunnerOutput(sampled_token_ids={})
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.token_ids.tolist()
        return RunnerOutput(sampled_token_ids={rid: [t] for rid, t in zip(self.request_ids, tokens, strict=True)})


class ModelRunner:
    """Owns the model, its KV cache and the sampler on one device.

    The runner keeps no per-request state between steps: everything a step needs travels in
    its ``SchedulerOutput``, so finished and preempted requests need no cleanup here.
    """

    def __init__(
        self, model_config: ModelConfig, engine_args: EngineArgs, attention_backend: str | None = None
    ) -> None:
        self.model_config = model_config
        self.args = engine_args
        self.device = model_config.device
        self.block_size = engine_args.block_size
        if attention_backend is None and engine_args.attention_backend != "auto":
            attention_backend = engine_args.attention_backend
        self.attention_backend = select_attention_backend(self.device, attention_backend)
        self.attention_backend_name = self.attention_backend.name
        self.sampler = Sampler(model_config.eos_token_ids, seed=engine_args.seed)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.model: torch.nn.Module | None = None
        self.kv_caches: KVCaches = []
        max_blocks = -(-model_config.max_model_len // self.block_size)
        self.buffers = InputBuffers(
            max(engine_args.max_num_batched_tokens, engine_args.max_num_seqs), engine_args.max_num_seqs,
            max_blocks, self.block_size, self.device,
        )
        self.graphs: StepGraphs | None = None
        # Each request's row in the ids the last asynchronous step sampled (``buffers.sampled_ids``):
        # where the next step's placeholder inputs come from.
        self._sampled_rows: dict[str, int] | None = None

    def load_model(self) -> None:
        self.model = load_model(self.model_config, self.args.load_format, self.args.cpu_onednn_linear)

    def initialize_kv_cache(self, draft_block_bytes: int = 0) -> int:
        """Size, allocate and bind the KV cache; return its number of blocks. A draft model's
        cache has as many blocks: ``draft_block_bytes`` is its share of each block's cost (its
        weights must be loaded already, so that the GPU profile counts them)."""
        assert self.model is not None, "load_model() first"
        block_bytes = kv_block_bytes(self.model_config, self.block_size) + draft_block_bytes
        if self.args.num_kv_blocks is not None:
            num_blocks = self.args.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = num_blocks_from_gpu_memory(block_bytes, self.args, self.device, self._profile_peak_bytes())
        else:
            num_blocks = num_blocks_from_cpu_budget(block_bytes, self.args)
        self.kv_caches = allocate_kv_cache(self.model_config, num_blocks, self.block_size)
        self.model.bind_kv_cache(self.kv_caches)
        logger.info(
            "KV cache: %d blocks of %d tokens, %d bytes per block (%d of them the draft's), %.2f GiB",
            num_blocks, self.block_size, block_bytes, draft_block_bytes, num_blocks * block_bytes / 2**30,
        )
        if self.device.type == "cuda":
            from engine.kernels.pdl import pdl_args

            state = "on" if pdl_args(self.device) else "off (needs compute capability 9.0+, and SLUICE_PDL != 0)"
            logger.info("Triton kernels: programmatic dependent launch %s", state)
        if self.uses_cuda_graphs:
            self.graphs = StepGraphs(self.model, self.buffers, self.attention_backend, self.max_graph_batch_size,
                                       self.args.num_speculative_tokens if self.args.speculative else 0,
                                       self.max_verify_batch_size, self.args.max_cuda_graph_prefill_tokens)
            self.graphs.capture()
        return num_blocks

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.args.enforce_eager and self.attention_backend.graph_safe

    @property
    def max_graph_batch_size(self) -> int:
        return min(self.args.max_cuda_graph_batch_size or self.args.max_num_seqs, self.args.max_num_seqs)

    @property
    def max_verify_batch_size(self) -> int:
        """The largest batch that may verify drafts: above the switch-off size nobody drafts."""
        limit = self.args.speculative_disable_batch_size
        return self.max_graph_batch_size if limit is None else min(limit, self.max_graph_batch_size)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput,
                draft_probs: Mapping[str, torch.Tensor] | None = None) -> RunnerOutput:
        """Run the step. ``draft_probs``: per request whose drafts a proposer drew at random, the
        distributions it drew them from (``[its drafts, vocab]``; the scheduler may have cut the
        drafts, never reordered them); requests missing from it are verified as one-hot drafts."""
        assert self.model is not None and self.kv_caches, "load_model() and initialize_kv_cache() first"
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return RunnerOutput(sampled_token_ids={})
        logits = self._logits(scheduled)
        sampled = [r for r in scheduled if r.sample]
        if not sampled:
            return RunnerOutput(sampled_token_ids={})
        rows = [SamplingRow(r.sampling_params, r.prompt_token_ids, r.output_token_ids) for r in sampled]
        if any(r.draft_token_ids for r in sampled):
            return self._verify(logits, sampled, rows, draft_probs or {})
        out = self.sampler(logits, rows)
        return RunnerOutput(
            sampled_token_ids={r.request_id: [tok] for r, tok in zip(sampled, out.token_ids, strict=True)},
            logprobs={
                r.request_id: [entry]
                for r, entry in zip(sampled, out.logprobs, strict=True)
                if entry is not None
            },
        )

    def _verify(self, logits: torch.Tensor, sampled: list[ScheduledRequest], rows: list[SamplingRow],
                draft_probs: Mapping[str, torch.Tensor]) -> RunnerOutput:
        """A step with drafts: every sampled request through the rejection sampler (without
        drafts it gives exactly the sampler's token)."""
        drafts = [r.draft_token_ids for r in sampled]
        out = self.rejection_sampler(logits, rows, drafts, _padded_draft_probs(sampled, draft_probs, logits))
        return RunnerOutput(
            sampled_token_ids={r.request_id: tokens for r, tokens in zip(sampled, out.token_ids, strict=True)},
            logprobs={r.request_id: entries for r, entries in zip(sampled, out.logprobs, strict=True)
                      if entries is not None},
            num_accepted_draft_tokens={r.request_id: n for r, n in zip(sampled, out.num_accepted, strict=True)
                                       if r.draft_token_ids},
        )

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        """Launch the step and its sampling without waiting for the device; the returned
        tokens also feed the next step's placeholder inputs. No logprobs: the engine schedules
        asynchronously only requests that need none."""
        assert self.model is not None and self.kv_caches, "load_model() and initialize_kv_cache() first"
        scheduled = scheduler_output.scheduled
        sampled = [r for r in scheduled if r.sample]
        logits = self._logits(scheduled) if scheduled else None
        if not sampled:
            self._sampled_rows = None
            return PendingOutput([], None)
        rows = [SamplingRow(r.sampling_params, r.prompt_token_ids, r.output_token_ids) for r in sampled]
        token_ids = self.sampler.sample_tokens(logits, rows, out=self.buffers.sampled_ids[:len(rows)])
        self._sampled_rows = {r.request_id: i for i, r in enumerate(sampled)}
        request_ids = [r.request_id for r in sampled]
        if not token_ids.is_cuda:  # a copy: the next step samples into the same buffer
            return PendingOutput(request_ids, token_ids.clone())
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingOutput(request_ids, host, ready)

    def _logits(self, scheduled: list[ScheduledRequest]) -> torch.Tensor | None:
        return step_logits(self.model, self.buffers, self.attention_backend, self.graphs, scheduled,
                           sampled_rows=self._sampled_rows)

    def _profile_peak_bytes(self) -> int:
        """Peak device memory, less the KV cache, of a forward over the most tokens a step can
        take: the token budget, or fewer where ``max_num_seqs`` whole contexts are fewer."""
        assert self.model is not None
        max_len = self.model_config.max_model_len
        budget = min(self.args.max_num_batched_tokens, self.args.max_num_seqs * max_len)
        lengths = [min(max_len, budget - done) for done in range(0, budget, max_len)]
        num_blocks = -(-max(lengths) // self.block_size)
        # Every dummy request writes the same blocks: only memory, not values, matters here.
        self.model.bind_kv_cache(allocate_kv_cache(self.model_config, num_blocks, self.block_size))
        scheduled = [
            ScheduledRequest(f"profile-{i}", [0] * n, 0, list(range(num_blocks)), True, None, [], [])
            for i, n in enumerate(lengths)
        ]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            inputs = self.buffers.prepare(scheduled)
            with set_forward_context(inputs.metadata, self.attention_backend):
                hidden = self.model(inputs.input_ids, inputs.positions)
            self.model.compute_logits(hidden[: min(self.args.max_num_seqs, budget)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        torch.cuda.empty_cache()
        return peak - num_blocks * kv_block_bytes(self.model_config, self.block_size)


def _padded_draft_probs(sampled: list[ScheduledRequest], draft_probs: Mapping[str, torch.Tensor],
                        logits: torch.Tensor) -> torch.Tensor | None:
    """``[requests, most drafts, vocab]`` for the rejection sampler, or None when no request
    drew its drafts at random. Drafts of other sampled requests are one-hot there: verified as
    such, drafts from anywhere are lossless."""
    if not any(r.request_id in draft_probs and not r.sampling_params.is_greedy for r in sampled):
        return None
    k = max(len(r.draft_token_ids) for r in sampled)
    padded = logits.new_zeros((len(sampled), k, logits.shape[-1]), dtype=torch.float32)
    for i, r in enumerate(sampled):
        n = len(r.draft_token_ids)
        if not n or r.sampling_params.is_greedy:
            continue  # greedy rows only compare with the argmax
        if r.request_id in draft_probs:
            padded[i, :n] = draft_probs[r.request_id][:n]
        else:
            padded[i, torch.arange(n, device=logits.device),
                   to_device(r.draft_token_ids, logits.device)] = 1.0
    return padded
