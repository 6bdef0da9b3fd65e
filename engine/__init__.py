"""Everything that touches tensors: models, weight loading, attention, sampling, the step loop."""

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
