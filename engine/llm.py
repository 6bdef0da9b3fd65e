"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

PromptType = str | list[int]


class LLM:
    """Generate offline with continuous batching: every prompt is admitted, then the engine
    steps until all are done. Keyword arguments are ``EngineArgs`` fields."""

    def __init__(self, model: str, **engine_args: object) -> None:
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; ``cache_salt`` keeps these prompts' prefix-cache blocks
        apart from those of requests with another salt (per-tenant isolation)."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError(
                f"sampling_params: got {len(params_list)} for {len(prompt_list)} prompts"
            )
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        # Validate everything first so that a bad prompt admits nothing.
        prepared = [
            self.engine.prepare_request(str(next(self._ids)), p, sp, prio, cache_salt)
            for p, sp, prio in zip(prompt_list, params_list, priorities)
        ]
        results: dict[str, RequestOutput] = {}
        for req in prepared:
            self.engine.add_prepared_request(req)
            results[req.request_id] = RequestOutput(
                request_id=req.request_id,
                prompt=req.prompt,
                prompt_token_ids=req.prompt_token_ids,
                outputs=[CompletionOutput(i, "", []) for i in range(req.params.n)],
                finished=False,
            )
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                _accumulate(results[delta.request_id], delta)
        return [results[req.request_id] for req in prepared]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]
    for p in prompts:
        if not isinstance(p, (str, list)):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(p).__name__}")
    return prompts


def _accumulate(total: RequestOutput, delta: RequestOutput) -> None:
    total.finished = delta.finished
    total.num_cached_tokens = delta.num_cached_tokens
    total.metrics = delta.metrics
    for d in delta.outputs:
        total.outputs[d.index].merge(d)
