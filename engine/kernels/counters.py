"""Arrival counters for kernels whose programs combine their partial results in the last program
to arrive (the AWQ kernels' split-K sums, the sampling kernel's chunks): each such program bumps
its slot, and the one that sees every other arrival combines the partials and resets the slot to
zero. One fixed area per device, allocated once, so CUDA graphs can capture launches that use it.
"""

from __future__ import annotations

import torch

ARRIVAL_SLOTS = 1 << 14
ARRIVALS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, slots: int) -> torch.Tensor:
    """The device's ARRIVAL_SLOTS int32 counters, zero between launches; ``slots`` is how many the
    launch uses. Launches that use them must not run concurrently on one device (sluice runs its
    forward passes and sampling on one stream)."""
    assert slots <= ARRIVAL_SLOTS, f"{slots} arrival counters wanted: more than the {ARRIVAL_SLOTS} there are"
    counters = ARRIVALS.get(device)
    if counters is None:
        counters = ARRIVALS[device] = torch.zeros(ARRIVAL_SLOTS, dtype=torch.int32, device=device)
    return counters
