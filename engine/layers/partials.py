"""A linear's output left as its split-K partial sums, for the kernel after it to add up.

A split-K linear (awq_mma.py at 1-16 tokens) ends with a tail: each program stores its fp32
partial sums, takes an arrival counter, and the last program of a column block adds them and
rounds. Where the next kernel reads that output anyway and can add the partials while it loads
them (SiLU-and-mul after a gate/up projection, rotary + cache write after a q/k/v projection),
the linear stores its partials and exits, and that kernel forms the same bits: the sum from zero
in split order, rounded once to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SplitKPartials:
    """``partials`` fp32 ``[split_k, T, N]`` (contiguous; ``split_k`` may be 1) of a linear's
    ``[T, N]`` output in ``dtype``."""

    partials: torch.Tensor
    dtype: torch.dtype
