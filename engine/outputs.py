"""What ``LLM.generate`` and the engine's step return, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# One entry per generated token: token id -> Logprob (the sampled token plus the top-n).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    # Speculative decoding so far (cumulative, like cumulative_logprob): drafts verified, accepted.
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0

    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same choice (text, tokens, logprobs; its finish state)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
            self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        self.num_draft_tokens, self.num_accepted_draft_tokens = delta.num_draft_tokens, delta.num_accepted_draft_tokens


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """Result of one request. From ``LLM.generate`` it is cumulative; from ``LLMEngine.step``
    each ``CompletionOutput`` carries only what is new since the last step (a delta)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = field(default=None)
