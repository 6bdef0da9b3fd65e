"""Turn the engine's deltas into ``GenerateResponse`` messages, one per choice."""

from __future__ import annotations

import time

import grpc

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from service.request_stream import RequestStream
from sluice.v1 import generation_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORTED,
    "error": pb.FINISH_REASON_ERROR,
}


def responses_of(delta: RequestOutput, stream: RequestStream) -> list[pb.GenerateResponse]:
    """One message per choice in ``delta``; a finished choice's message carries its usage."""
    return [_response(delta, c, stream) for c in sorted(delta.outputs, key=lambda c: c.index)]


def rejection(request_id: str, code: grpc.StatusCode, message: str) -> pb.GenerateResponse:
    """A request refused before acceptance, as a final message (for multiplexed streams)."""
    return pb.GenerateResponse(
        request_id=request_id,
        finish_reason=pb.FINISH_REASON_ERROR,
        error=pb.Error(code=code.value[0], message=message),
    )


def _response(delta: RequestOutput, c: CompletionOutput, stream: RequestStream) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=delta.request_id, index=c.index, token_ids=c.token_ids, text=c.text)
    if c.logprobs is not None:
        entries = zip(c.token_ids, c.logprobs, strict=True)
        resp.logprobs.extend(_token_logprob(tid, entry, stream.num_top_logprobs) for tid, entry in entries)
    if c.finish_reason is None:
        return resp
    resp.finish_reason = FINISH_REASONS[c.finish_reason]
    if isinstance(c.stop_reason, str):
        resp.stop_string = c.stop_reason
    elif isinstance(c.stop_reason, int):
        resp.stop_token_id = c.stop_reason
    if c.finish_reason == "error":
        resp.error.code = grpc.StatusCode.INTERNAL.value[0]
        resp.error.message = delta.error or "the request failed"
    resp.usage.CopyFrom(_usage(delta, stream.num_output_tokens[c.index]))
    resp.usage.draft_tokens = c.num_draft_tokens
    resp.usage.accepted_draft_tokens = c.num_accepted_draft_tokens
    return resp


def _usage(delta: RequestOutput, completion_tokens: int) -> pb.Usage:
    usage = pb.Usage(
        prompt_tokens=len(delta.prompt_token_ids),
        completion_tokens=completion_tokens,
        cached_prompt_tokens=delta.num_cached_tokens,
    )
    m = delta.metrics
    if m is not None:
        if m.first_scheduled_time is not None:
            usage.queue_wait_seconds = m.first_scheduled_time - m.arrival_time
        if m.first_token_time is not None:
            usage.time_to_first_token_seconds = m.first_token_time - m.arrival_time
        end = m.finished_time if m.finished_time is not None else time.monotonic()
        usage.total_seconds = end - m.arrival_time
    return usage


def _token_logprob(token_id: int, entry: dict[int, Logprob], num_top: int) -> pb.TokenLogprob:
    sampled = entry[token_id]
    ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
    return pb.TokenLogprob(
        token_id=token_id,
        logprob=sampled.logprob,
        rank=sampled.rank or 0,
        top_logprobs=[pb.TopLogprob(token_id=tid, logprob=lp.logprob, rank=lp.rank or 0)
                      for tid, lp in ranked[:num_top]],
    )
