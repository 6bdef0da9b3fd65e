"""Everything that touches tensors: models, weight loading, attention, sampling, the step loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm import LLM

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> object:
    # Lazy: importing a light submodule (sampling params, kernels) must not load the whole engine.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
