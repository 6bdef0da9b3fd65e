"""Coalescing step deltas: when a client reads more slowly than the engine steps, the deltas
queued for its request travel as one message per choice (several tokens each)."""

from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput


def coalesce(outputs: list[RequestOutput]) -> RequestOutput:
    """Merge consecutive deltas of one request into one delta, choice by choice, in order."""
    assert outputs and all(o.request_id == outputs[0].request_id for o in outputs)
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionOutput] = {}
    for out in outputs:
        for c in out.outputs:
            into = merged.get(c.index)
            if into is None:
                merged[c.index] = CompletionOutput(
                    index=c.index,
                    text=c.text,
                    token_ids=list(c.token_ids),
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=None if c.logprobs is None else list(c.logprobs),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    num_draft_tokens=c.num_draft_tokens,
                    num_accepted_draft_tokens=c.num_accepted_draft_tokens,
                )
                continue
            assert into.finish_reason is None, f"choice {c.index} of {out.request_id} went on after finishing"
            into.merge(c)
    last = outputs[-1]
    return RequestOutput(
        request_id=last.request_id,
        prompt=last.prompt,
        prompt_token_ids=last.prompt_token_ids,
        outputs=list(merged.values()),
        finished=last.finished,
        num_cached_tokens=last.num_cached_tokens,
        metrics=last.metrics,
        error=next((o.error for o in reversed(outputs) if o.error is not None), None),
    )
