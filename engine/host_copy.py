"""Small host values (per-request parameters, indices) onto the device without a host sync.

A copy from pageable host memory is not truly asynchronous (the driver stages it, and
``torch.tensor(..., device="cuda")`` waits for the whole stream): with asynchronous
scheduling that stalls the host until the step in flight ends. Staging through pinned memory
(torch's caching host allocator, which keeps the buffer alive until the copy has run) lets the
host queue the copy and move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence | np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` as a tensor on ``device``, queued on the current stream without waiting."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    if isinstance(values, np.ndarray):  # torch cannot pin a tensor built from an array: copy it
        staged = torch.as_tensor(values, dtype=dtype).pin_memory()
    else:
        staged = torch.tensor(values, dtype=dtype, pin_memory=True)
    return staged.to(device, non_blocking=True)
