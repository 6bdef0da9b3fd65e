"""The step's model inputs in persistent buffers: one pinned host staging area and one device
area with the same layout, so a step costs one host-to-device copy, and CUDA graphs can capture
views that stay valid across steps.

A step with T tokens and R request rows (a graph's padded counts: the same for every replay of
that graph, so its views keep their addresses) lays its sections out back to back, each starting
16-byte aligned, and only that prefix of the area travels, up to the last block-table entry the
step wrote (its rows' stride stays ``max_blocks``)::

    int64:  [ input_ids (T) | positions (T) | slot_mapping (T) | placeholder_src (T) ]
    int32:  [ query_start_loc (R + 1) | seq_lens (R) | decode_order (R) | block_tables (R x max_blocks) ]

``placeholder_src[t]`` is, for a token whose id the step in flight samples (asynchronous
scheduling), that id's row in ``sampled_ids``, where the runner's sampler writes; -1 for every
other token. ``resolve_placeholders`` puts those ids into ``input_ids`` on the device, inside
the step's CUDA graph when one serves it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.host_copy import to_device
from scheduler.outputs import ScheduledRequest

# Every section starts 16-byte aligned (Triton specializes kernels on their pointers' alignment:
# an offset that moved with the batch would compile new variants mid-serving).
_ALIGN64, _ALIGN32 = 2, 4


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] on the device
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    # Rows of the hidden states to sample, or None for a graph step (its graph computes the
    # logits of every row, request by request).
    logits_indices: torch.Tensor | None
    # [T]: each token's row in InputBuffers.sampled_ids when a step in flight samples its id, else -1.
    placeholder_src: torch.Tensor
    has_placeholders: bool


class InputBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, block_size: int,
                 device: torch.device) -> None:
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"
        size = self._int32_offset(max_tokens) + 4 * self._int32_len(max_reqs)
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.zeros(size, dtype=torch.uint8, device=device)
        self._np = self.host.numpy()
        # The ids the last asynchronous step sampled, one row per request that sampled.
        self.sampled_ids = torch.zeros(max_reqs, dtype=torch.int64, device=device)
        # The host area is rewritten only after the previous step's copy has run.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _int32_offset(num_tokens: int) -> int:
        return 8 * 4 * _round_up(num_tokens, _ALIGN64)

    def _int32_len(self, num_reqs: int) -> int:
        return _round_up(num_reqs + 1, _ALIGN32) + 2 * _round_up(num_reqs, _ALIGN32) + num_reqs * self.max_blocks

    def _sections(self, area: np.ndarray | torch.Tensor, num_tokens: int, num_reqs: int) -> tuple:
        """(input_ids, positions, slot_mapping, placeholder_src, query_start_loc, seq_lens,
        decode_order, block_tables) of a step with these counts, as views of ``area`` (the host's,
        numpy, or the device's)."""
        t, r = num_tokens, num_reqs
        at = self._int32_offset(t)
        if isinstance(area, np.ndarray):
            d64, d32 = area[:at].view(np.int64), area[at:at + 4 * self._int32_len(r)].view(np.int32)
        else:
            d64, d32 = area[:at].view(torch.int64), area[at:at + 4 * self._int32_len(r)].view(torch.int32)
        t2 = _round_up(t, _ALIGN64)
        seq, order = _round_up(r + 1, _ALIGN32), _round_up(r + 1, _ALIGN32) + _round_up(r, _ALIGN32)
        bt = order + _round_up(r, _ALIGN32)
        return (d64[:t], d64[t2:t2 + t], d64[2 * t2:2 * t2 + t], d64[3 * t2:3 * t2 + t],
                d32[:r + 1], d32[seq:seq + r], d32[order:order + r], d32[bt:].reshape(r, self.max_blocks))

    # ------------------------------------------------------------------ filling
    def prepare(self, scheduled: Sequence[ScheduledRequest], graph_shape: tuple[int, int, bool, int] | None = None,
                sampled_rows: Mapping[str, int] | None = None) -> StepInputs:
        """Lay out ``scheduled`` on the host, copy it to the device and return device views.

        Logits are taken at the last token of each request that samples, and for a verify step
        at its last 1 + k tokens (one row per verified position, in order).

        With ``graph_shape`` = (a CUDA graph's batch size, its tokens per request: 1 for a decode
        step, 1 + k for a verify step, False, its requests' length bound or 0), requests past the
        batch are padding with that many tokens each: slot -1 (nothing written), seq_len 0 (decode)
        or 1 + k (verify, reading block 0); and ``max_seq_len`` is the bound every replay shares:
        the graph's, or the longest block table's length. With (1, n, True, 0), a prefill graph's,
        the one request's tokens are padded to n: ids and positions 0, slot -1, outside its
        ``query_start_loc`` span.

        A token with a negative id is a placeholder for the id the step in flight samples:
        ``sampled_rows`` maps its request to that id's row in ``sampled_ids``."""
        num_reqs = len(scheduled)
        num_new = np.fromiter((len(r.token_ids) for r in scheduled), dtype=np.int64, count=num_reqs)
        starts = np.fromiter((r.start_position for r in scheduled), dtype=np.int64, count=num_reqs)
        num_tokens = int(num_new.sum())
        seq_lens = starts + num_new
        assert num_tokens <= self.max_tokens and num_reqs <= self.max_reqs, (num_tokens, num_reqs)
        t, r = num_tokens, num_reqs  # the sections' lengths: a graph's padded counts
        if graph_shape is not None:
            size, per_request, prefill, bound = graph_shape
            fits = num_tokens <= per_request if prefill else (num_new == per_request).all()
            fits = fits and not (bound and seq_lens.max() > bound)
            assert num_reqs <= size and fits, "the step does not fit the graph"
            t, r = size * per_request, size
        bs = self.block_size
        if self._copied is not None:
            self._copied.synchronize()
        ids, pos, slots, src, qsl, lens, order, bt = self._sections(self._np, t, r)

        ids[:num_tokens] = np.fromiter(
            itertools.chain.from_iterable(req.token_ids for req in scheduled), dtype=np.int64, count=num_tokens
        )
        cu_new = np.cumsum(num_new)
        # Token j of request i sits at position starts[i] + (j - cu_new_before[i]).
        offsets = np.repeat(starts - (cu_new - num_new), num_new)
        positions = np.arange(num_tokens, dtype=np.int64) + offsets
        pos[:num_tokens] = positions

        # Each row's table, then null blocks (0) up to the batch's longest: kernels may read a row
        # that far (masked), and this part of the area may hold another step's sections.
        max_seq_len = int(seq_lens.max())
        width = -(-max_seq_len // bs)
        for i, req in enumerate(scheduled):
            n = len(req.block_table)
            assert n * bs >= seq_lens[i], f"the block table of {req.request_id} does not cover its new tokens"
            bt[i, :n] = req.block_table
            bt[i, n:width] = 0
        # The copy's end, in block-table entries: the last row's last one written.
        last_row_end = (num_reqs - 1) * self.max_blocks + max(len(scheduled[-1].block_table), width)
        request_of_token = np.repeat(np.arange(num_reqs), num_new)
        src[:] = -1
        placeholders = np.flatnonzero(ids[:num_tokens] < 0)
        if placeholders.size:
            assert sampled_rows is not None, "a placeholder input without a step in flight"
            src[placeholders] = [sampled_rows[scheduled[i].request_id] for i in request_of_token[placeholders]]
            ids[placeholders] = 0  # a valid id until resolve_placeholders writes the sampled one
        block_ids = bt[request_of_token, positions // bs].astype(np.int64)
        slots[:num_tokens] = block_ids * bs + positions % bs

        qsl[0] = 0
        qsl[1:num_reqs + 1] = cu_new
        lens[:num_reqs] = seq_lens
        if graph_shape is not None:
            ids[num_tokens:] = 0
            pos[num_tokens:] = 0
            slots[num_tokens:] = -1
            qsl[num_reqs + 1:] = np.arange(num_tokens + per_request, t + 1, per_request)
            # A padded verify request's KV must cover its queries (a negative context would send the
            # prefill kernels before its block table): it reads block 0, writes none.
            lens[num_reqs:] = 0 if per_request == 1 else per_request
            bt[num_reqs:, :-(-per_request // bs)] = 0
            if num_reqs < r:
                last_row_end = (r - 1) * self.max_blocks - (-per_request // bs)
            max_seq_len = min(bound, self.max_blocks * bs) if bound else self.max_blocks * bs
        order[:] = np.argsort(-lens, kind="stable")

        end = int(bt.ctypes.data - self._np.ctypes.data) + 4 * last_row_end
        self.dev[:end].copy_(self.host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

        logits_indices = None if graph_shape is not None else to_device(
            _logits_indices(scheduled, cu_new), self.device)
        input_ids, positions_d, slot_mapping, placeholder_src, query_start_loc, seq_lens_d, order_d, block_tables = \
            self._sections(self.dev, t, r)
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_d,
            block_tables=block_tables,
            max_query_len=int(num_new.max()),
            max_seq_len=max_seq_len,
            decode_order=order_d,
        )
        return StepInputs(input_ids, positions_d, metadata, logits_indices, placeholder_src, bool(placeholders.size))

    def resolve_placeholders(self, inputs: StepInputs) -> None:
        """Write into ``inputs.input_ids`` the ids of its placeholder tokens from ``sampled_ids``,
        on the device, without a host sync (inside a CUDA graph when captured in one)."""
        if self.device.type == "cuda":
            from engine.kernels.placeholders import resolve_placeholders

            resolve_placeholders(inputs.input_ids, inputs.placeholder_src, self.sampled_ids)
            return
        take = inputs.placeholder_src >= 0
        inputs.input_ids[take] = self.sampled_ids[inputs.placeholder_src[take]]


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
