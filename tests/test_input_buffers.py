"""The step's input buffers (engine/input_buffers.py): what one step lays out and copies, where
its sections sit, and its placeholder tokens resolved from the previous step's sampled ids (on
the CPU with torch, and through Triton's interpreter with the kernel the GPU runs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from engine.input_buffers import InputBuffers
from scheduler.outputs import ScheduledRequest

BLOCK_SIZE = 4
MAX_BLOCKS = 5


def _request(request_id: str, token_ids: list[int], start: int, blocks: list[int]) -> ScheduledRequest:
    return ScheduledRequest(request_id, token_ids, start, blocks, True, None, [], [])


def _buffers() -> InputBuffers:
    return InputBuffers(max_tokens=64, max_reqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE,
                        device=torch.device("cpu"))


def test_a_step_lays_out_its_inputs_and_copies_only_its_prefix() -> None:
    buffers = _buffers()
    buffers.dev.fill_(0xAB)
    scheduled = [_request("a", [5, 6, 7], 2, [3, 1]), _request("b", [9], 6, [0, 4])]
    inputs = buffers.prepare(scheduled)
    meta = inputs.metadata
    assert inputs.input_ids.tolist() == [5, 6, 7, 9]
    assert inputs.positions.tolist() == [2, 3, 4, 6]
    # Slot = block_table[pos // 4] * 4 + pos % 4.
    assert meta.slot_mapping.tolist() == [3 * 4 + 2, 3 * 4 + 3, 1 * 4 + 0, 4 * 4 + 2]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [5, 7]
    assert meta.decode_order.tolist() == [1, 0]  # longest first
    assert meta.block_tables[:, :2].tolist() == [[3, 1], [0, 4]]
    assert inputs.placeholder_src.tolist() == [-1] * 4 and not inputs.has_placeholders
    assert inputs.logits_indices.tolist() == [2, 3]
    # One copy: the step's sections up to its last block-table entry (row b's second), nothing after.
    used = meta.block_tables[1, 1:2].data_ptr() + 4 - buffers.dev.data_ptr()
    assert (buffers.dev[used:] == 0xAB).all() and not (buffers.dev[:used] == 0xAB).any()


def test_short_block_tables_end_in_null_blocks_up_to_the_longest() -> None:
    """A row is read (masked) as far as the batch's longest request: past its own table it holds
    the null block, whatever an earlier step left in that part of the area."""
    buffers = _buffers()
    buffers.host.fill_(0x7F)
    inputs = buffers.prepare([_request("a", [5], 0, [3]), _request("b", [9], 10, [1, 2, 4])])
    assert inputs.metadata.block_tables[:, :3].tolist() == [[3, 0, 0], [1, 2, 4]]


@pytest.mark.parametrize(("num_tokens", "num_reqs", "graph_shape"),
                         [(1, 1, None), (3, 2, None), (7, 5, None), (1, 1, (2, 1, False, 0)), (4, 2, (3, 2, False, 0))])
def test_every_section_starts_16_byte_aligned(num_tokens: int, num_reqs: int, graph_shape) -> None:
    """Triton specializes kernels on 16-byte pointer alignment: a section that moved off it with
    the batch would compile new variants mid-serving."""
    buffers = _buffers()
    per = num_tokens // num_reqs
    scheduled = [_request(f"r{i}", [1] * (per + (i == 0) * (num_tokens - per * num_reqs)), 0, [i])
                 for i in range(num_reqs)]
    inputs = buffers.prepare(scheduled, graph_shape=graph_shape)
    meta = inputs.metadata
    for section in (inputs.input_ids, inputs.positions, meta.slot_mapping, inputs.placeholder_src,
                    meta.query_start_loc, meta.seq_lens, meta.decode_order, meta.block_tables):
        assert (section.data_ptr() - buffers.dev.data_ptr()) % 16 == 0


def test_graph_padding_rows_read_block_zero() -> None:
    """A graph's padded rows: no tokens' slots written (-1), decode lengths 0, verify lengths 1 + k
    over block 0, whatever an earlier step left in that part of the area."""
    buffers = _buffers()
    buffers.prepare([_request(f"r{i}", list(range(2, 10)), 0, [4, 3]) for i in range(4)])  # fills the area
    inputs = buffers.prepare([_request("a", [5, 6], 3, [2, 1])], graph_shape=(4, 2, False, 0))
    meta = inputs.metadata
    assert meta.seq_lens.tolist() == [5, 2, 2, 2]
    assert meta.query_start_loc.tolist() == [0, 2, 4, 6, 8]
    assert meta.slot_mapping.tolist()[2:] == [-1] * 6 and inputs.input_ids.tolist()[2:] == [0] * 6
    assert meta.block_tables[1:, 0].tolist() == [0, 0, 0]
    decode = buffers.prepare([_request("a", [5], 3, [2, 1])], graph_shape=(4, 1, False, 0)).metadata
    assert decode.seq_lens.tolist() == [4, 0, 0, 0] and decode.block_tables[1:, 0].tolist() == [0, 0, 0]


def test_placeholders_take_the_previous_steps_sampled_ids() -> None:
    """Asynchronous scheduling: a token with id -1 is the one the step in flight samples; its
    row in ``sampled_ids`` travels with the step, and the ids are filled in on the device."""
    buffers = _buffers()
    buffers.sampled_ids[:3] = torch.tensor([70, 71, 72])
    scheduled = [_request("a", [-1], 4, [0, 1]), _request("b", [8, 9], 2, [2]), _request("c", [-1], 7, [3, 4])]
    inputs = buffers.prepare(scheduled, sampled_rows={"c": 0, "x": 1, "a": 2})
    assert inputs.has_placeholders and inputs.placeholder_src.tolist() == [2, -1, -1, 0]
    assert inputs.input_ids.tolist() == [0, 8, 9, 0]
    buffers.resolve_placeholders(inputs)
    assert inputs.input_ids.tolist() == [72, 8, 9, 70]
    with pytest.raises(AssertionError, match="without a step in flight"):
        buffers.prepare(scheduled)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("num_tokens", [1, 37, 1500])
def test_resolve_kernel_matches_the_torch_path(num_tokens: int) -> None:
    from engine.kernels.placeholders import resolve_placeholders

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    sampled = torch.as_tensor(rng.integers(0, 1000, 16), dtype=torch.int64)
    src = torch.as_tensor(np.where(rng.random(num_tokens) < 0.3, rng.integers(0, 16, num_tokens), -1))
    ids = torch.as_tensor(rng.integers(0, 1000, num_tokens), dtype=torch.int64)
    want = torch.where(src >= 0, sampled[src.clamp(min=0)], ids)
    got = ids.to(device)
    resolve_placeholders(got, src.to(device), sampled.to(device))
    assert torch.equal(got.cpu(), want)
