"""Runs what the scheduler decided: one flattened forward over every scheduled token, then one
sampled token for each request whose chunk reaches its last token.

::

    scheduled:   req A: start 5, 3 new tokens      req B: start 0, 4 new tokens (prompt chunk)
    input_ids:   [a5 a6 a7 | b0 b1 b2 b3]          query_start_loc = [0, 3, 7]
    positions:   [ 5  6  7 |  0  1  2  3]          seq_lens        = [8, 4]
    slots:       block_table[pos // block_size] * block_size + pos % block_size
    sampled at:  the last token of each request with sample=True (index 2 and 6)
"""

from __future__ import annotations

import itertools
import logging

import torch

from engine.attention.backend import select_attention_backend
from engine.attention.metadata import AttentionMetadata, set_forward_context
from engine.config import EngineArgs
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
from scheduler.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


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
        self.model: torch.nn.Module | None = None
        self.kv_caches: KVCaches = []

    def load_model(self) -> None:
        self.model = load_model(self.model_config, self.args.load_format)

    def initialize_kv_cache(self) -> int:
        """Size, allocate and bind the KV cache; return its number of blocks."""
        assert self.model is not None, "load_model() first"
        if self.args.num_kv_blocks is not None:
            num_blocks = self.args.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = num_blocks_from_gpu_memory(self.model_config, self.args, self._profile_peak_bytes())
        else:
            num_blocks = num_blocks_from_cpu_budget(self.model_config, self.args)
        self.kv_caches = allocate_kv_cache(self.model_config, num_blocks, self.block_size)
        self.model.bind_kv_cache(self.kv_caches)
        block_bytes = kv_block_bytes(self.model_config, self.block_size)
        logger.info(
            "KV cache: %d blocks of %d tokens, %d bytes per block, %.2f GiB",
            num_blocks, self.block_size, block_bytes, num_blocks * block_bytes / 2**30,
        )
        return num_blocks

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        assert self.model is not None and self.kv_caches, "load_model() and initialize_kv_cache() first"
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return RunnerOutput(sampled_token_ids={})
        input_ids, positions, metadata, sample_indices = self._prepare_inputs(scheduled)
        with set_forward_context(metadata, self.attention_backend):
            hidden = self.model(input_ids, positions)
        sampled = [r for r in scheduled if r.sample]
        if not sampled:
            return RunnerOutput(sampled_token_ids={})
        logits = self.model.compute_logits(hidden[sample_indices])
        rows = [SamplingRow(r.sampling_params, r.prompt_token_ids, r.output_token_ids) for r in sampled]
        out = self.sampler(logits, rows)
        return RunnerOutput(
            sampled_token_ids={r.request_id: [tok] for r, tok in zip(sampled, out.token_ids, strict=True)},
            logprobs={
                r.request_id: [entry]
                for r, entry in zip(sampled, out.logprobs, strict=True)
                if entry is not None
            },
        )

    def _prepare_inputs(
        self, scheduled: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flattened ids and positions, the attention metadata, and the indices of the tokens
        to sample from, all on the device; built on the host with no per-token Python loop."""
        num_new = [r.num_new_tokens for r in scheduled]
        seq_lens = [r.start_position + r.num_new_tokens for r in scheduled]
        assert all(
            len(r.block_table) * self.block_size >= n for r, n in zip(scheduled, seq_lens, strict=True)
        ), "a block table does not cover its request's new tokens"
        max_blocks = max(len(r.block_table) for r in scheduled)
        input_ids = torch.tensor(list(itertools.chain.from_iterable(r.token_ids for r in scheduled)))
        block_tables = torch.tensor(
            [r.block_table + [0] * (max_blocks - len(r.block_table)) for r in scheduled], dtype=torch.int32
        )
        num_new_t = torch.tensor(num_new)
        cu_num_new = num_new_t.cumsum(0)
        query_start_loc = torch.zeros(len(scheduled) + 1, dtype=torch.int32)
        query_start_loc[1:] = cu_num_new
        # Token t of request r sits at position start_position[r] + (t - query_start_loc[r]).
        starts_t = torch.tensor([r.start_position for r in scheduled])
        offset = (starts_t - (cu_num_new - num_new_t)).repeat_interleave(num_new_t)
        positions = torch.arange(len(input_ids)) + offset
        request_of_token = torch.arange(len(scheduled)).repeat_interleave(num_new_t)
        block_ids = block_tables[request_of_token, positions // self.block_size].long()
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        sample_indices = (cu_num_new - 1)[torch.tensor([r.sample for r in scheduled])]
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device, non_blocking=True),
            query_start_loc=query_start_loc.to(self.device, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(self.device, non_blocking=True),
            block_tables=block_tables.to(self.device, non_blocking=True),
            max_query_len=max(num_new),
            max_seq_len=max(seq_lens),
        )
        return (
            input_ids.to(self.device, non_blocking=True),
            positions.to(self.device, non_blocking=True),
            metadata,
            sample_indices.to(self.device, non_blocking=True),
        )

    def _profile_peak_bytes(self) -> int:
        """Peak device memory, less the KV cache, of a forward over a full token budget."""
        assert self.model is not None
        budget = self.args.max_num_batched_tokens
        max_len = self.model_config.max_model_len
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
            input_ids, positions, metadata, _ = self._prepare_inputs(scheduled)
            with set_forward_context(metadata, self.attention_backend):
                hidden = self.model(input_ids, positions)
            self.model.compute_logits(hidden[: min(self.args.max_num_seqs, budget)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        torch.cuda.empty_cache()
        return peak - num_blocks * kv_block_bytes(self.model_config, self.block_size)
