"""CUDA graphs for decode, verify and short single-request prefill steps: one graph per (batch
size bucket, tokens per request), all sharing one memory pool.

A graph replays the captured kernels on the persistent input buffers' fixed addresses, so a
step costs its host-side input preparation, one copy and one replay, whatever the number of
kernels (asynchronous scheduling's placeholder ids are filled in by the graph's first kernel).
A decode step has 1 token per request; a verify step 1 + k (the last sampled token and k
drafts), all of them sampled. A batch of n requests replays the smallest captured size >= n;
the extra requests are padding (slot -1: nothing written to the KV cache; their logits are
dropped)::

    sizes: 1 2 4 8 16 32 48 ... max      batch of 37 -> graph 48, requests 37..47 padding
    verify (k = 4): 5 tokens per request, sizes up to the largest batch that still speculates

Decode graphs of up to SHORT_GRAPH_MAX_BATCH requests are also captured with the attention
metadata's length bound ``max_seq_len`` at SHORT_SEQ_LEN instead of the block tables' full length,
and serve steps whose requests are all that short: their attention kernels take a tiling for
short contexts (decode_attention.py)::

    decode, 1 request at 300 tokens  -> graph (1, 1, max_seq_len=2048)
    decode, 1 request at 3000 tokens -> graph (1, 1)

A step of one request with 2..``max_prefill_tokens`` new tokens (a short prompt, or a chunk of
one, at low load) replays a prefill graph of the next larger token count: its tokens after the
real ones are padding (slot -1, outside the request's ``query_start_loc`` span, so attention
never reads them and their rows are dropped), and the graph computes the logits of the last
real token only. Eager, such a step costs its kernels' launches (hundreds for a small model),
more than the device's work::

    prefill tokens: 16 32 64 128 256 512     prompt of 100 -> graph of 128, tokens 100..127 padding

The decode graph of one request is captured with its kernels placed ahead (engine/kernels/pdl.py's
``trigger_before_wait``) when every linear requests its whole weight before its wait (a small
model: the weights stream while norms, rotary and attention run; its qkv and gate_up GEMVs also
take the RMSNorm before them).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import set_forward_context
from engine.input_buffers import InputBuffers, StepInputs
from engine.kernels.decode_attention import SHORT_SEQ_LEN
from engine.kernels.pdl import pdl_args, trigger_before_wait
from engine.layers.linear import one_token_weights_ahead
from scheduler.outputs import ScheduledRequest

logger = logging.getLogger(__name__)


class GraphShape(NamedTuple):
    batch_size: int
    tokens_per_request: int
    # One request with up to ``tokens_per_request`` new tokens, the rest padding; logits of its
    # last real token only.
    prefill: bool = False
    # A decode graph for requests of at most this many tokens (its attention's length bound); 0: any.
    max_seq_len: int = 0


# Decode graphs of up to this many requests come twice: for any length, and for requests of at
# most SHORT_SEQ_LEN tokens, whose attention then takes the short-context tiling of the Triton
# kernels (engine/kernels/decode_attention.py: where the keys are cut into its MAX_SPLITS, as at
# batch 1, and 2, with 8 kv heads). Measured at one request: Llama-3.1-8B AWQ on an H200, 128 + 256
# tokens, 1.941 -> 1.915 ms a token (docs/benchmarks.md, session 31).
SHORT_GRAPH_MAX_BATCH = 1
# The graph that one request's decode replays while it is at most SHORT_SEQ_LEN tokens long.
ONE_REQUEST_DECODE = GraphShape(1, 1, max_seq_len=SHORT_SEQ_LEN)


def capture_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to 16, then every multiple of 16, up to and including ``max_batch_size``."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes) | {max_batch_size})


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    """Powers of two from 16 below ``max_tokens``, and ``max_tokens``; none below 2 tokens."""
    if max_tokens < 2:
        return []
    return sorted({1 << e for e in range(4, max_tokens.bit_length()) if 1 << e < max_tokens} | {max_tokens})


class StepGraphs:
    """Decode graphs up to ``max_batch_size`` requests; with ``num_speculative_tokens`` k > 0,
    verify graphs of 1 + k tokens per request up to ``max_verify_batch_size`` requests (as many
    as the input buffers hold); with ``max_prefill_tokens``, single-request prefill graphs up to
    that many tokens (as many as the input buffers hold, and no more than one context: a block
    table row's worth)."""

    def __init__(self, model: nn.Module, buffers: InputBuffers, backend: AttentionBackend,
                 max_batch_size: int, num_speculative_tokens: int = 0, max_verify_batch_size: int = 0,
                 max_prefill_tokens: int = 0) -> None:
        self.model = model
        self.buffers = buffers
        self.backend = backend
        self.sizes: dict[int, list[int]] = {1: capture_sizes(max_batch_size)}
        per_request = 1 + num_speculative_tokens
        max_verify = min(max_verify_batch_size, buffers.max_tokens // per_request)
        if num_speculative_tokens and max_verify >= 1:
            self.sizes[per_request] = capture_sizes(max_verify)
        self.prefill_sizes = prefill_capture_sizes(
            min(max_prefill_tokens, buffers.max_tokens, buffers.max_blocks * buffers.block_size))
        self.one_token_ahead = False  # set by capture()
        self._graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        self._logits: dict[GraphShape, torch.Tensor] = {}

    @property
    def shapes(self) -> list[GraphShape]:
        short = [GraphShape(size, 1, max_seq_len=SHORT_SEQ_LEN) for size in self.sizes[1]
                 if size <= SHORT_GRAPH_MAX_BATCH]
        return [GraphShape(size, per_request) for per_request, sizes in self.sizes.items() for size in sizes] + [
            GraphShape(1, tokens, prefill=True) for tokens in self.prefill_sizes] + short

    def shape_for(self, scheduled: list[ScheduledRequest]) -> GraphShape | None:
        """The graph that serves this step, or None when it is not a plain decode step, a verify
        step with the same number of drafts for every request, or a short step of one request."""
        per_request = len(scheduled[0].token_ids)
        if len(scheduled) == 1 and per_request > 1 and not scheduled[0].draft_token_ids:
            prefill = self.prefill_sizes
            if not prefill or per_request > prefill[-1]:
                return None
            return GraphShape(1, prefill[bisect.bisect_left(prefill, per_request)], prefill=True)
        sizes = self.sizes.get(per_request)
        if sizes is None or len(scheduled) > sizes[-1] or any(
                len(r.token_ids) != per_request or not r.sample or len(r.draft_token_ids) != per_request - 1
                for r in scheduled):
            return None
        size = sizes[bisect.bisect_left(sizes, len(scheduled))]
        short = per_request == 1 and size <= SHORT_GRAPH_MAX_BATCH and all(
            r.start_position + 1 <= SHORT_SEQ_LEN for r in scheduled)
        return GraphShape(size, per_request, max_seq_len=SHORT_SEQ_LEN if short else 0)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # The decode graph of one request, where every linear's weight is requested before its
        # PDL wait: captured with each kernel letting the next be placed before it waits.
        self.one_token_ahead = bool(pdl_args(self.buffers.device)) and one_token_weights_ahead(self.model)
        # Largest first, so that smaller graphs reuse the pool's blocks.
        for shape in sorted(self.shapes, key=lambda s: s.batch_size * s.tokens_per_request, reverse=True):
            inputs = self.buffers.prepare(self.capture_step(shape), graph_shape=shape)
            # Slot -1: capture writes nothing into the KV cache.
            inputs.metadata.slot_mapping.fill_(-1)
            ahead = trigger_before_wait() if self.places_ahead(shape) else nullcontext()
            with set_forward_context(inputs.metadata, self.backend), ahead:
                self._forward(inputs, shape.prefill)  # an eager run first compiles every kernel outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(inputs, shape.prefill)
            self._graphs[shape], self._logits[shape] = graph, logits
        torch.cuda.synchronize()
        kinds = [f"{'decode' if per_request == 1 else f'verify ({per_request} tokens)'} batch sizes {sizes}"
                 for per_request, sizes in self.sizes.items()]
        short = [s.batch_size for s in self.shapes if s.max_seq_len]
        if short:
            kinds[0] += f" (sizes {short} also for requests of at most {SHORT_SEQ_LEN} tokens)"
        if self.prefill_sizes:
            kinds.append(f"one request's prefill up to {self.prefill_sizes} tokens")
        logger.info("captured %d CUDA graphs in %.1f s: %s", len(self._graphs), time.perf_counter() - start,
                    "; ".join(kinds))
        if self.one_token_ahead:
            logger.info("decode graph of one request: every linear's weight is requested before its PDL wait, "
                        "kernels placed ahead")

    def capture_step(self, shape: GraphShape) -> list[ScheduledRequest]:
        """The step a graph of ``shape`` is captured with: its batch of requests at position 0,
        each ``tokens_per_request`` tokens (with drafts to verify) in null blocks."""
        size, per_request, prefill, _ = shape
        num_blocks = -(-per_request // self.buffers.block_size)
        drafts = [] if prefill else [0] * (per_request - 1)
        return [ScheduledRequest(f"graph-{i}", [0] * per_request, 0, [0] * num_blocks, True, None, [], [], drafts)
                for i in range(size)]

    def places_ahead(self, shape: GraphShape) -> bool:
        """Whether the graph of ``shape`` is captured with its kernels placed ahead: a decode graph
        of one request (for any length bound) of a model whose every linear requests its whole
        weight before its wait (``one_token_ahead``)."""
        return self.one_token_ahead and (shape.batch_size, shape.tokens_per_request, shape.prefill) == (1, 1, False)

    def _forward(self, inputs: StepInputs, prefill: bool) -> torch.Tensor:
        # Placeholder ids (asynchronous scheduling) from the previous step's sampler, in the graph.
        self.buffers.resolve_placeholders(inputs)
        hidden = self.model(inputs.input_ids, inputs.positions)
        if prefill:
            # The one row of a prefill graph, its request's last real token: computed in the graph
            # from the persistent query_start_loc that every replay rewrites.
            hidden = hidden.index_select(0, inputs.metadata.query_start_loc[1:] - 1)
        return self.model.compute_logits(hidden)

    def replay(self, shape: GraphShape) -> torch.Tensor:
        """Run the graph of ``shape`` on what the buffers hold; its logits ``[size * tokens per
        request, vocab]``, request by request (a prefill graph's ``[1, vocab]``)."""
        self._graphs[shape].replay()
        return self._logits[shape]


def step_logits(model: nn.Module, buffers: InputBuffers, backend: AttentionBackend,
                graphs: StepGraphs | None, scheduled: list[ScheduledRequest],
                sampled_rows: Mapping[str, int] | None = None) -> torch.Tensor | None:
    """Run one step's forward and return the logits at its sampled positions (the rows
    ``InputBuffers.prepare`` lays out), or None when nothing samples: replayed from a graph
    when one serves the step, eagerly otherwise (always on CPU, where ``graphs`` is None).
    ``sampled_rows``: where the step in flight left the ids of this step's placeholder tokens
    (``InputBuffers.prepare``)."""
    shape = graphs.shape_for(scheduled) if graphs is not None else None
    if shape is not None:
        assert graphs is not None
        buffers.prepare(scheduled, graph_shape=shape, sampled_rows=sampled_rows)
        logits = graphs.replay(shape)
        if shape.prefill:
            return logits if scheduled[0].sample else None
        return logits[: len(scheduled) * shape.tokens_per_request]
    inputs = buffers.prepare(scheduled, sampled_rows=sampled_rows)
    if inputs.has_placeholders:
        buffers.resolve_placeholders(inputs)
    with set_forward_context(inputs.metadata, backend):
        hidden = model(inputs.input_ids, inputs.positions)
    assert inputs.logits_indices is not None
    num_logits = inputs.logits_indices.numel()
    if num_logits == 0:
        return None
    # Increasing indices, as many as the tokens (every token sampled): 0 .. T - 1, no gather.
    return model.compute_logits(hidden if num_logits == hidden.shape[0] else hidden[inputs.logits_indices])
