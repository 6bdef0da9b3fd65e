"""The ``torch`` attention backend: plain PyTorch, the CPU's backend and every backend's oracle.

Two computations of the same thing:

- the reference (``reference_attention``, and ``TorchAttentionBackend(reference=True)``; on
  any device but the CPU, always): one request at a time, gathering its keys and values block
  by block through its block table and computing an explicit masked softmax in float32. Every
  other backend is tested against it, so it favours clarity.
- the lean CPU path (the default on the CPU), for decode and verify steps where a forward costs
  more in small ops than in arithmetic. Once per forward (its first layer), it lists the cache
  slots each request's queries can see, padded to a batch::

      request b (n new tokens, keys visible from position lo_b):
          key_slots[b] = slot(lo_b), slot(lo_b + 1), ..., slot(seq_len_b - 1), padding
          bias[b]      = 0 where query i may see key j, -inf elsewhere (None: it sees them all)

  and every layer then does one ``index_select`` of those slots for K and one for V, and two
  batched matmuls with the same float32 softmax as the reference (padding repeats a written
  slot, so masked entries are finite). Results agree with the reference to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from engine.kernels.decode_attention import DecodeSplits


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new tokens' ``k``, ``v [T, Hkv, D]`` at ``slot_mapping [T]`` of the paged caches."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# ---------------------------------------------------------------------------- reference
def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Grouped-query attention of ``q [Lq, H, D]`` over ``k``, ``v [Lk, Hkv, D]``, where a
    query at position p sees keys at positions in ``(p - sliding_window, p]``."""
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    groups = num_heads // num_kv_heads
    qf = q.float().view(num_q, num_kv_heads, groups, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale
    allowed = k_positions[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        allowed &= k_positions[None, :] > q_positions[:, None] - sliding_window
    scores.masked_fill_(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return out.reshape(num_q, num_heads, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query token per request, all requests at once: gather every request's blocks into a
    padded ``[B, L, Hkv, D]`` batch and mask past its length (and outside its window). Padding
    and released entries of the block table point at the null block, whose slots are masked."""
    num_reqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    num_blocks = -(-metadata.max_seq_len // block_size)
    tables = metadata.block_tables[:, :num_blocks].long()
    keys = k_cache[tables].flatten(1, 2).float()  # [B, L, Hkv, D]
    values = v_cache[tables].flatten(1, 2).float()
    key_pos = torch.arange(keys.shape[1], device=q.device)
    q_pos = metadata.seq_lens.long() - 1
    allowed = key_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= key_pos[None, :] > q_pos[:, None] - sliding_window
    # Slots past a request's length may hold anything (even NaN): zero them so 0 * garbage never leaks.
    values = values.masked_fill(~allowed[:, :, None, None], 0.0)
    qf = q.float().view(num_reqs, num_kv_heads, groups, head_dim)
    scores = torch.einsum("bhgd,bkhd->bhgk", qf, keys) * scale
    scores.masked_fill_(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgk,bkhd->bhgd", scores.softmax(dim=-1), values)
    return out.reshape(num_reqs, num_heads, head_dim).to(q.dtype)


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """The attention of step 2 of ``AttentionBackend.forward`` (the new K/V already written)."""
    if metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_reqs:
        return decode_attention(q, k_cache, v_cache, metadata, scale, sliding_window)
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    device = q.device
    starts = metadata.query_start_loc.tolist()
    for i, seq_len in enumerate(metadata.seq_lens.tolist()):
        begin, end = starts[i], starts[i + 1]
        if begin == end:
            continue
        first_query_pos = seq_len - (end - begin)
        # Read only blocks that some query can see: freed (null) blocks lie wholly before them.
        lowest_visible = 0 if sliding_window is None else max(0, first_query_pos - sliding_window + 1)
        first_block = lowest_visible // block_size
        num_blocks = -(-seq_len // block_size)
        blocks = metadata.block_tables[i, first_block:num_blocks].long()
        key_start = first_block * block_size
        keys = k_cache[blocks].flatten(0, 1)[: seq_len - key_start]
        values = v_cache[blocks].flatten(0, 1)[: seq_len - key_start]
        out[begin:end] = causal_attention(
            q[begin:end],
            keys,
            values,
            torch.arange(first_query_pos, seq_len, device=device),
            torch.arange(key_start, seq_len, device=device),
            scale,
            sliding_window,
        )
    return out


# ---------------------------------------------------------------------------- lean CPU path
@dataclass(slots=True)
class _Group:
    """``num_reqs`` requests with ``num_queries`` new tokens each (token rows from ``token_start``),
    attended as one padded batch over ``num_keys`` gathered keys each (from ``key_start`` of the
    plan's gather, request after request)."""

    token_start: int
    num_reqs: int
    num_queries: int
    key_start: int
    num_keys: int
    bias: torch.Tensor | None  # [num_reqs, num_queries, 1, num_keys] float32 0 / -inf; None: all visible


@dataclass(slots=True)
class AttentionPlan:
    """What every layer of one forward reads from the paged cache, worked out once."""

    key_slots: torch.Tensor  # [sum over groups of num_reqs * num_keys] int64 flat cache slots
    groups: list[_Group]


def visible_keys(tables: np.ndarray, first_query: np.ndarray, n: int, block_size: int,
                 sliding_window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """For B requests whose n new tokens sit at positions ``first_query[b] ..`` (their KV already
    written), with block tables ``tables [B, >= blocks]``: the cache slots of the keys they see,
    ``[B, L]`` int64 from the first visible position (0, or the window's start: keys before it are
    never read, their blocks may be freed) to the last new token, padded to the longest request by
    repeating its last slot; and ``allowed [B, n, L]``, which query sees which key."""
    seq_lens = first_query + n
    lo = np.zeros_like(first_query) if sliding_window is None else np.maximum(0, first_query - sliding_window + 1)
    key_pos = lo[:, None] + np.arange(int((seq_lens - lo).max()))  # [B, L]
    read_pos = np.minimum(key_pos, seq_lens[:, None] - 1)
    slots = np.take_along_axis(tables, read_pos // block_size, axis=1).astype(np.int64) * block_size
    slots += read_pos % block_size
    q_pos = first_query[:, None] + np.arange(n)  # [B, n]
    allowed = key_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= key_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    return slots, allowed


def plan_attention(metadata: AttentionMetadata, block_size: int, sliding_window: int | None) -> AttentionPlan:
    """The slots and masks of a forward. Requests that all have the same number of new tokens (a
    decode or a verify step, a lone prefill) make one padded group; otherwise each request is a
    group of its own, so a long prefill never pads a batch of decodes."""
    seq_lens = metadata.seq_lens.numpy().astype(np.int64)
    query_start_loc = metadata.query_start_loc.numpy().astype(np.int64)
    num_new = np.diff(query_start_loc)
    first_query = seq_lens - num_new
    tables = metadata.block_tables.numpy()
    if len(num_new) and (num_new == num_new[0]).all():
        spans = [(0, len(num_new))] if num_new[0] else []
    else:
        spans = [(i, i + 1) for i in np.flatnonzero(num_new).tolist()]
    slot_lists, groups, key_start = [], [], 0
    for first, end in spans:
        n = int(num_new[first])
        slots, allowed = visible_keys(tables[first:end], first_query[first:end], n, block_size, sliding_window)
        bias = None
        if not allowed.all():
            bias = torch.from_numpy(np.where(allowed, np.float32(0), np.float32(-np.inf)))[:, :, None, :]
        groups.append(_Group(int(query_start_loc[first]), end - first, n, key_start, slots.shape[1], bias))
        slot_lists.append(slots.reshape(-1))
        key_start += slots.size
    key_slots = torch.from_numpy(np.concatenate(slot_lists)) if slot_lists else torch.zeros(0, dtype=torch.int64)
    return AttentionPlan(key_slots, groups)


def lean_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, scale: float
) -> torch.Tensor:
    """Attention of ``q [T, H, D]`` over the keys ``plan`` lists (the new K/V already written)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.key_slots).float()
    values = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.key_slots).float()
    if len(plan.groups) == 1:  # every request's rows
        return _attend_group(q, keys, values, plan.groups[0], scale)
    out = torch.empty_like(q)
    for group in plan.groups:
        rows = slice(group.token_start, group.token_start + group.num_reqs * group.num_queries)
        span = slice(group.key_start, group.key_start + group.num_reqs * group.num_keys)
        out[rows] = _attend_group(q[rows], keys[span], values[span], group, scale)
    return out


def _attend_group(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: _Group, scale: float
                  ) -> torch.Tensor:
    """``q [B * n, H, D]`` over ``keys``, ``values [B * L, Hkv, D]`` (float32): scores
    ``[B, Hkv, n * G, L]`` with each kv head's query rows ordered (query, head in group)."""
    b, n, length = group.num_reqs, group.num_queries, group.num_keys
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = keys.shape[1]
    groups = num_heads // num_kv_heads
    qg = q.float().view(b, n, num_kv_heads, groups, head_dim).transpose(1, 2).reshape(b, num_kv_heads, n * groups,
                                                                                      head_dim)
    scores = torch.matmul(qg, keys.view(b, length, num_kv_heads, head_dim).permute(0, 2, 3, 1))
    scores.mul_(scale)
    if group.bias is not None:  # broadcast over kv heads and the heads of a group
        scores.view(b, num_kv_heads, n, groups, length).add_(group.bias[:, None])
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, values.view(b, length, num_kv_heads, head_dim).transpose(1, 2))
    return out.view(b, num_kv_heads, n, groups, head_dim).transpose(1, 2).reshape(b * n, num_heads, head_dim).to(
        q.dtype)


class TorchAttentionBackend(AttentionBackend):
    """``reference``: always the reference computation (tests use it as the lean path's oracle).
    The lean path's plan is kept for the forward whose metadata it was made from: the runner
    builds a new ``AttentionMetadata`` for every forward and never changes one after."""

    name = "torch"

    def __init__(self, reference: bool = False) -> None:
        self.reference = reference
        self._plan_metadata: AttentionMetadata | None = None
        self._plan_shape: tuple[int, int | None] = (0, None)  # (block_size, sliding_window)
        self._plan: AttentionPlan | None = None

    def forward(
        self,
        layer: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        leave_splits: bool = False,
    ) -> torch.Tensor | DecodeSplits:
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if self.reference or q.device.type != "cpu":
            return reference_attention(q, k_cache, v_cache, metadata, scale, sliding_window)
        return lean_attention(q, k_cache, v_cache, self.plan(metadata, k_cache.shape[1], sliding_window), scale)

    def plan(self, metadata: AttentionMetadata, block_size: int, sliding_window: int | None) -> AttentionPlan:
        """The forward's plan: made by its first layer, reused by the others."""
        shape = (block_size, sliding_window)
        if self._plan is None or self._plan_metadata is not metadata or self._plan_shape != shape:
            self._plan = plan_attention(metadata, block_size, sliding_window)
            self._plan_metadata, self._plan_shape = metadata, shape
        return self._plan
