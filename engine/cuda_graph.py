"""CUDA graphs for decode steps: one graph per batch size bucket, sharing one memory pool.

A graph replays the captured kernels on the persistent input buffers' fixed addresses, so a
decode step costs its host-side input preparation, two copies and one replay, whatever the
number of kernels. A batch of n requests replays the smallest captured size >= n; the extra
rows are padding (slot -1: nothing written to the KV cache; their logits are dropped)::

    sizes: 1 2 4 8 16 32 48 ... max      batch of 37 -> graph 48, rows 37..47 padding
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import set_forward_context
from engine.input_buffers import InputBuffers
from scheduler.outputs import ScheduledRequest

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to 16, then every multiple of 16, up to and including ``max_batch_size``."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes) | {max_batch_size})


class DecodeGraphs:
    def __init__(self, model: nn.Module, buffers: InputBuffers, backend: AttentionBackend,
                 max_batch_size: int) -> None:
        self.model = model
        self.buffers = buffers
        self.backend = backend
        self.sizes = capture_sizes(max_batch_size)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def size_for(self, scheduled: list[ScheduledRequest]) -> int | None:
        """The graph size that serves this step, or None when it is not a plain decode step."""
        n = len(scheduled)
        if n > self.sizes[-1] or any(len(r.token_ids) != 1 or not r.sample for r in scheduled):
            return None
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so that smaller graphs reuse the pool's blocks.
        for size in reversed(self.sizes):
            dummy = [ScheduledRequest(f"graph-{i}", [0], 0, [0], True, None, [], []) for i in range(size)]
            inputs = self.buffers.prepare(dummy, graph_size=size)
            # Slot -1: capture writes nothing into the KV cache.
            inputs.metadata.slot_mapping.fill_(-1)
            with set_forward_context(inputs.metadata, self.backend):
                # An eager run first compiles every kernel outside the capture.
                self.model.compute_logits(self.model(inputs.input_ids, inputs.positions))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.compute_logits(self.model(inputs.input_ids, inputs.positions))
            self._graphs[size], self._logits[size] = graph, logits
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batch sizes %s in %.1f s",
                    len(self.sizes), self.sizes, time.perf_counter() - start)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of ``size`` on what the buffers hold; its logits ``[size, vocab]``."""
        self._graphs[size].replay()
        return self._logits[size]
