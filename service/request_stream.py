"""The asyncio side of one request in flight: the deltas the engine hands over, read by
the servicer as one coalesced delta per wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.outputs import CompletionOutput, RequestOutput
from service.deltas import coalesce

if TYPE_CHECKING:
    from engine.llm_engine import PreparedRequest


class RequestStream:
    """The deltas of one submitted request, read on the asyncio loop.

    Deltas that arrive while the reader is busy are queued and handed over as one coalesced
    delta, so a slow reader gets several tokens per message instead of falling behind. With
    ``stream_interval`` n > 1 the reader also waits until n output tokens are queued, except
    for the first delta and the final one.
    """

    __slots__ = ("request_id", "n", "prompt", "prompt_token_ids", "num_top_logprobs", "num_output_tokens", "_accepted",
                 "_pending", "_ready", "_open", "_on_close", "_closed", "_interval", "_sent_first",
                 "_pending_tokens")

    def __init__(self, prepared: PreparedRequest, accepted: asyncio.Future[None],
                 on_close: Callable[[RequestStream], None], stream_interval: int = 1) -> None:
        self.request_id = prepared.request_id
        self.n = prepared.params.n
        self.prompt = prepared.prompt
        self.prompt_token_ids = prepared.prompt_token_ids
        self.num_top_logprobs = prepared.params.logprobs or 0
        self.num_output_tokens = [0] * self.n
        self._accepted = accepted
        self._pending: list[RequestOutput] = []
        self._ready = asyncio.Event()
        self._open = set(range(self.n))
        self._on_close = on_close
        self._closed = False
        self._interval = stream_interval
        self._sent_first = False
        self._pending_tokens = 0

    @property
    def closed(self) -> bool:
        """The reader left (``close``)."""
        return self._closed

    @property
    def finished(self) -> bool:
        """Every choice has its final delta queued (or the request was rejected)."""
        return not self._open

    async def wait_accepted(self) -> None:
        """Return once the engine admitted the request; raise why it did not (``QueueFullError``,
        ``EngineUnavailableError``, ``ValueError``)."""
        await asyncio.shield(self._accepted)

    def push(self, output: RequestOutput) -> None:
        """Queue a delta from the engine (called on the loop)."""
        for c in output.outputs:
            self.num_output_tokens[c.index] += len(c.token_ids)
            self._pending_tokens += len(c.token_ids)
            if c.finish_reason is not None:
                self._open.discard(c.index)
        self._pending.append(output)
        if self._due():  # the reader wakes only for a message it will send
            self._ready.set()

    def reject(self) -> None:
        """The engine refused the request: the stream ends with nothing to read."""
        self._open.clear()
        self._ready.set()

    def fail(self, error: str) -> None:
        """End every open choice with an ``error`` delta."""
        self.push(RequestOutput(
            request_id=self.request_id, prompt=None, prompt_token_ids=self.prompt_token_ids,
            outputs=[CompletionOutput(i, "", [], finish_reason="error") for i in sorted(self._open)],
            finished=True, error=error,
        ))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._due():
            if self.finished and not self._pending:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        batch, self._pending = self._pending, []
        self._sent_first, self._pending_tokens = True, 0
        return coalesce(batch)

    def _due(self) -> bool:
        """Whether the queued deltas make a message now."""
        if not self._pending:
            return False
        return (self._interval == 1 or not self._sent_first or self.finished
                or self._pending_tokens >= self._interval or self._pending[-1].error is not None)

    def close(self) -> None:
        """Stop reading; aborts the request in the engine unless it already finished. Idempotent."""
        if not self._closed:
            self._closed = True
            self._on_close(self)
