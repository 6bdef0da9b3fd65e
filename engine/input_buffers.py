"""The step's model inputs in persistent buffers: one pinned host staging area and one device
area per integer type, each with a fixed layout, so a step costs two host-to-device copies and
CUDA graphs can capture views that stay valid across steps.

::

    int64 area:  [ input_ids  (max_tokens) | positions (max_tokens) | slot_mapping (max_tokens) ]
    int32 area:  [ query_start_loc (max_reqs + 1) | seq_lens (max_reqs) | decode_order (max_reqs)
                   | block_tables (max_reqs x max_blocks) ]

A step with T tokens and R requests fills the first T (R) entries of each section; only the
int32 area's prefix up to row R of the block tables travels to the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.host_copy import to_device
from scheduler.outputs import ScheduledRequest


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] on the device
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    # Rows of the hidden states to sample, or None for a graph step (its graph computes the
    # logits of every row, request by request).
    logits_indices: torch.Tensor | None
    # Tokens whose id a step still in flight samples (asynchronous scheduling): their index in
    # input_ids, and the index of their request in the step's scheduled list.
    placeholder_tokens: np.ndarray
    placeholder_requests: np.ndarray


class InputBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, block_size: int,
                 device: torch.device) -> None:
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"
        size64 = 3 * max_tokens
        size32 = 3 * max_reqs + 1 + max_reqs * max_blocks
        self.host64 = torch.zeros(size64, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(size32, dtype=torch.int32, pin_memory=pin)
        self.dev64 = torch.zeros(size64, dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(size32, dtype=torch.int32, device=device)
        self.np64, self.np32 = self.host64.numpy(), self.host32.numpy()
        # The host areas are rewritten only after the previous step's copies have run.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        # Section offsets.
        self._order = 2 * max_reqs + 1
        self._bt = 3 * max_reqs + 1

    # ------------------------------------------------------------------ device views
    def device_views(self, num_tokens: int, num_reqs: int) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, slot_mapping, query_start_loc, seq_lens, decode_order, block_tables)
        on the device."""
        t, r = self.max_tokens, self.max_reqs
        d64, d32 = self.dev64, self.dev32
        return (
            d64[:num_tokens], d64[t:t + num_tokens], d64[2 * t:2 * t + num_tokens],
            d32[:num_reqs + 1], d32[r + 1:r + 1 + num_reqs], d32[self._order:self._order + num_reqs],
            d32[self._bt:self._bt + num_reqs * self.max_blocks].view(num_reqs, self.max_blocks),
        )

    # ------------------------------------------------------------------ filling
    def prepare(self, scheduled: Sequence[ScheduledRequest], graph_shape: tuple[int, int, bool] | None = None
                ) -> StepInputs:
        """Lay out ``scheduled`` on the host, copy it to the device and return device views.

        Logits are taken at the last token of each request that samples, and for a verify step
        at its last 1 + k tokens (one row per verified position, in order).

        With ``graph_shape`` = (a CUDA graph's batch size, its tokens per request: 1 for a decode
        step, 1 + k for a verify step, False), requests past the batch are padding with that many
        tokens each: slot -1 (nothing written), seq_len 0 (decode) or 1 + k (verify); and
        ``max_seq_len`` is the bound every replay shares, the longest block table's length. With
        (1, n, True), a prefill graph's, the one request's tokens are padded to n: ids and
        positions 0, slot -1, outside its ``query_start_loc`` span."""
        num_reqs = len(scheduled)
        num_new = np.fromiter((len(r.token_ids) for r in scheduled), dtype=np.int64, count=num_reqs)
        starts = np.fromiter((r.start_position for r in scheduled), dtype=np.int64, count=num_reqs)
        num_tokens = int(num_new.sum())
        seq_lens = starts + num_new
        assert num_tokens <= self.max_tokens and num_reqs <= self.max_reqs, (num_tokens, num_reqs)
        t, r, bs = self.max_tokens, self.max_reqs, self.block_size
        np64, np32 = self.np64, self.np32
        if self._copied is not None:
            self._copied.synchronize()

        np64[:num_tokens] = np.fromiter(
            itertools.chain.from_iterable(req.token_ids for req in scheduled), dtype=np.int64, count=num_tokens
        )
        cu_new = np.cumsum(num_new)
        # Token j of request i sits at position starts[i] + (j - cu_new_before[i]).
        offsets = np.repeat(starts - (cu_new - num_new), num_new)
        positions = np.arange(num_tokens, dtype=np.int64) + offsets
        np64[t:t + num_tokens] = positions

        bt = np32[self._bt:self._bt + r * self.max_blocks].reshape(r, self.max_blocks)
        for i, req in enumerate(scheduled):
            n = len(req.block_table)
            assert n * bs >= seq_lens[i], f"the block table of {req.request_id} does not cover its new tokens"
            bt[i, :n] = req.block_table
        request_of_token = np.repeat(np.arange(num_reqs), num_new)
        placeholder_tokens = np.flatnonzero(np64[:num_tokens] < 0)
        np64[placeholder_tokens] = 0  # a valid id until the runner writes the sampled one
        block_ids = bt[request_of_token, positions // bs].astype(np.int64)
        np64[2 * t:2 * t + num_tokens] = block_ids * bs + positions % bs

        np32[0] = 0
        np32[1:num_reqs + 1] = cu_new
        np32[r + 1:r + 1 + num_reqs] = seq_lens
        num_rows = num_reqs
        max_seq_len = int(seq_lens.max())
        if graph_shape is not None:
            size, per_request, prefill = graph_shape
            fits = num_tokens <= per_request if prefill else (num_new == per_request).all()
            assert num_reqs <= size and fits, "the step does not fit the graph"
            end = size * per_request
            np64[num_tokens:end] = 0
            np64[t + num_tokens:t + end] = 0
            np64[2 * t + num_tokens:2 * t + end] = -1
            np32[num_reqs + 1:size + 1] = np.arange(num_tokens + per_request, end + 1, per_request)
            # A padded verify request's KV must cover its queries (a negative context would send the
            # prefill kernels before its block table); it reads stale but valid blocks, writes none.
            np32[r + 1 + num_reqs:r + 1 + size] = 0 if per_request == 1 else per_request
            num_rows, num_tokens = size, end
            max_seq_len = self.max_blocks * bs
        lens = np32[r + 1:r + 1 + num_rows]
        np32[self._order:self._order + num_rows] = np.argsort(-lens, kind="stable")

        # Two copies: each area's used prefix (the int64 sections are small, copy them whole).
        self.dev64.copy_(self.host64, non_blocking=True)
        end32 = self._bt + num_rows * self.max_blocks
        self.dev32[:end32].copy_(self.host32[:end32], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

        logits_indices = None if graph_shape is not None else to_device(
            _logits_indices(scheduled, cu_new), self.device)
        input_ids, positions_d, slots, query_start_loc, seq_lens_d, order, block_tables = self.device_views(
            num_tokens, num_rows
        )
        metadata = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_d,
            block_tables=block_tables,
            max_query_len=int(num_new.max()),
            max_seq_len=max_seq_len,
            decode_order=order,
        )
        return StepInputs(input_ids, positions_d, metadata, logits_indices,
                          placeholder_tokens, request_of_token[placeholder_tokens])


def _logits_indices(scheduled: Sequence[ScheduledRequest], cu_new: np.ndarray) -> np.ndarray:
    """Flat token indices to take logits at: per sampling request its last 1 + k tokens (k its
    drafts, 0 outside a verify step), in request order."""
    num_reqs = len(scheduled)
    num_logits = np.fromiter((1 + len(r.draft_token_ids) if r.sample else 0 for r in scheduled),
                             dtype=np.int64, count=num_reqs)
    if (num_logits <= 1).all():
        return cu_new[num_logits == 1] - 1
    first = np.repeat(cu_new - num_logits, num_logits)
    within = np.arange(int(num_logits.sum())) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
    return first + within
