"""Incremental detokenization of one request's output, with stop strings.

Each new token is decoded over a small window of recent tokens, so the cost per token does not
grow with the output::

    token ids:  ... | prefix_offset ...... read_offset ...... end
                      `-- already emitted --'`-- new tokens --'
    delta = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

The tokens before ``read_offset`` give the decoder its context (a leading space, a byte-level
character spanning tokens), so the delta is exactly the text the new tokens add. While the window
ends in U+FFFD the last character may still be incomplete (a multi-byte character split across
tokens): the text before that run is released, the run waits for the next token.

Released text then passes the stop-string check. The stop string that is complete earliest in
the text wins (of two complete at the same place, the longer), so the result does not depend on
how tokens are grouped into ``update`` calls; unless ``include_stop_str_in_output``, text that
could be the start of a stop string is held back until it is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first output token, as context for it.
PROMPT_CONTEXT_TOKENS = 5


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False

    output_token_ids: list[int] = field(default_factory=list)
    finished_by_stop: str | None = None
    _ids: list[int] = field(default_factory=list)  # prompt context + output ids
    _prefix_offset: int = 0
    _read_offset: int = 0
    _prefix_text: str = ""  # decode(_ids[_prefix_offset:_read_offset])
    _released: int = 0  # characters of the window's new text already released
    _tail: str = ""  # the last released characters, searched again with the next ones
    _held: int = 0  # characters at the end of _tail not emitted: they may start a stop string
    _chunks: list[str] = field(default_factory=list)
    _max_stop_len: int = 0
    _stop_first_chars: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        assert all(self.stop), "stop strings must be non-empty"
        self._ids = list(self.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(0, self._read_offset)
        self._max_stop_len = max(map(len, self.stop), default=0)
        self._stop_first_chars = frozenset(s[0] for s in self.stop)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def update(self, new_token_ids: list[int]) -> str:
        """Take the newly generated tokens and return the text now safe to emit. Tokens after
        the one that completes a stop string are dropped (not added to ``output_token_ids``)."""
        delta = []
        for token_id in new_token_ids:
            if self.finished_by_stop is not None:
                break
            self.output_token_ids.append(token_id)
            self._ids.append(token_id)
            delta.append(self._emit(self._decode_new(final=False), final=False))
        return self._record("".join(delta))

    def flush(self) -> str:
        """The request ended for another reason: emit everything still held back."""
        if self.finished_by_stop is not None:
            return ""
        return self._record(self._emit(self._decode_new(final=True), final=True))

    def _decode_new(self, final: bool) -> str:
        """Text the tokens after ``read_offset`` add that is not released yet."""
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if not window_text.startswith(self._prefix_text):
            return ""  # the decoder reshaped the context; wait for more tokens
        start = len(self._prefix_text) + self._released
        if final or not window_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
            self._released = 0
            return window_text[start:]
        stable_end = len(window_text.rstrip(REPLACEMENT_CHAR))
        if stable_end <= start:
            return ""
        self._released += stable_end - start
        return window_text[start:stable_end]

    def _emit(self, released: str, final: bool) -> str:
        """Run the stop-string check over released text; return what may be emitted now.

        ``_tail`` keeps the last ``max_stop_len - 1`` released characters, so a stop string
        that began in earlier text is still found; its last ``_held`` characters are unsent."""
        if not self.stop:
            return released
        text = self._tail + released
        sent = len(self._tail) - self._held
        match = self._first_stop(text)
        if match is not None:
            start, stop = match
            self.finished_by_stop = stop
            return text[sent:start + len(stop) if self.include_stop_str_in_output else start]
        hold = 0 if final or self.include_stop_str_in_output else self._stop_prefix_len(text)
        self._held = hold
        self._tail = text[max(0, len(text) - self._max_stop_len + 1):]
        return text[sent:len(text) - hold]

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the stop string that ends first in ``text``."""
        best: tuple[int, int, str] | None = None
        for stop in self.stop:
            start = text.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key < best:
                best = key
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        for i in range(max(0, len(text) - self._max_stop_len + 1), len(text)):
            # Most positions fail on the first character; test that before slicing.
            if text[i] in self._stop_first_chars and any(s.startswith(text[i:]) for s in self.stop):
                return len(text) - i
        return 0

    def _record(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)
