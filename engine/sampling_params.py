"""Per-request sampling parameters, with vLLM's field names and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy.

    ``logprobs``: None for none; 0 for the sampled token's logprob only; k for the sampled
    token plus the k most likely tokens at each position. Logprobs are those of the model's
    raw distribution (log-softmax of the logits, before penalties and temperature).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no text (and so no stop strings)
    speculative_decoding: bool = True  # False: never draft for this request (when the engine speculates)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.verify()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def verify(self, vocab_size: int | None = None, max_logprobs: int = 20) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        _check_int("n", self.n, lo=1)
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, lo=-1)
        _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} > "
                f"max_tokens={self.max_tokens}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0)
            if self.logprobs > max_logprobs:
                raise ValueError(f"logprobs must be <= {max_logprobs}, got {self.logprobs}")
        if not isinstance(self.speculative_decoding, bool):
            raise ValueError(f"speculative_decoding must be a bool, got {self.speculative_decoding!r}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        for tid in self.stop_token_ids:
            _check_token_id("stop_token_ids", tid, vocab_size)
        for tid, bias in (self.logit_bias or {}).items():
            _check_token_id("logit_bias", tid, vocab_size)
            _check_float("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {tid}")


def _check_float(name: str, value: object, lo: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_int(name: str, value: object, lo: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_token_id(name: str, tid: object, vocab_size: int | None) -> None:
    _check_int(name, tid, lo=0)
    if vocab_size is not None and tid >= vocab_size:  # type: ignore[operator]
        raise ValueError(f"{name}: token id {tid} is outside the vocabulary (size {vocab_size})")
