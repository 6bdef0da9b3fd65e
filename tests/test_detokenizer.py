"""engine.detokenizer: streamed text against a direct decode of all output tokens."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from engine.tokenizer import Tokenizer

PROMPTS = ["", "Say something: ", "日本語 prompt 😀\n", "x"]
MULTIBYTE = "héllo wörld, naïve café — 日本語のテキスト 😀 emoji ✓"


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def mixed_tok() -> Tokenizer:
    """Byte-level BPE with one merge, " " + the first byte of a CJK character: a token whose text
    is a complete character followed by an incomplete one."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["Ġæ"] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "æ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [detok.update(chunk) for chunk in chunks] + [detok.flush()]


def _chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    chunks, start = [], 0
    for size in sizes:
        chunks.append(ids[start:start + size])
        start += size
    return chunks + [ids[start:]]


def _expected(tok: Tokenizer, ids: list[int], stops: list[str], include: bool, skip: bool):
    """(text, stop string, kept tokens), computed directly from full decodes. The stop string that
    is complete earliest in the text wins (the longer one on a tie); its token is the first whose
    prefix decode, less any trailing U+FFFD (an incomplete character), contains a stop string."""
    full = tok.decode(ids, skip_special_tokens=skip)
    found = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not found:
        return full, None, ids
    end, start, stop = min(found)
    kept = ids
    for n in range(1, len(ids)):
        released = tok.decode(ids[:n], skip_special_tokens=skip).rstrip(REPLACEMENT_CHAR)
        if any(s in released for s in stops):
            kept = ids[:n]
            break
    return full[:end] if include else full[:start], stop, kept


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deltas_concatenate_to_full_decode(tok: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40), label="ids")
    sizes = data.draw(st.lists(st.integers(0, 4), max_size=12), label="chunk sizes")
    prompt = tok.encode(data.draw(st.sampled_from(PROMPTS), label="prompt"))
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    final = tok.decode(ids, skip_special_tokens=skip)
    deltas = []
    for chunk in _chunked(ids, sizes):
        deltas.append(detok.update(chunk))
        # Whatever was emitted is final: an incomplete character never comes out as U+FFFD early.
        assert final.startswith("".join(deltas))
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text == final
    assert detok.output_token_ids == ids
    assert detok.finished_by_stop is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stop_strings_against_full_decode(tok: Tokenizer, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([MULTIBYTE, "one two three two one", "aaab aab ab b"]), label="text")
    ids = tok.encode(base) + data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=8))
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    full = tok.decode(ids, skip_special_tokens=skip)
    substring = st.tuples(st.integers(0, len(full)), st.integers(1, 6)).map(lambda t: full[t[0]:t[0] + t[1]])
    stop_st = st.one_of(substring, st.text("abcdeéo 日😀", min_size=1, max_size=4)).filter(bool)
    stops = data.draw(st.lists(stop_st, min_size=1, max_size=3), label="stops")
    include = data.draw(st.booleans(), label="include_stop_str_in_output")
    sizes = data.draw(st.lists(st.integers(0, 4), max_size=12), label="chunk sizes")
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "), skip, stops, include)
    deltas = _stream(detok, _chunked(ids, sizes))
    text, stop, kept = _expected(tok, ids, stops, include, skip)
    assert "".join(deltas) == detok.text == text
    assert detok.finished_by_stop == stop
    assert detok.output_token_ids == kept


def test_emoji_split_across_tokens_comes_out_whole(tok: Tokenizer) -> None:
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) >= 2  # the test needs a character whose bytes span tokens
    ids = tok.encode("a") + emoji_ids + tok.encode("b")
    detok = IncrementalDetokenizer(tok, tok.encode("hi "))
    deltas = [detok.update([i]) for i in ids]
    assert deltas == ["a"] + [""] * (len(emoji_ids) - 1) + ["😀", "b"]
    assert detok.flush() == ""


def test_flush_releases_incomplete_character(tok: Tokenizer) -> None:
    partial = tok.encode("😀")[:-1]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.update(tok.encode("ok") + partial) == "ok"
    assert detok.flush() == tok.decode(partial) == REPLACEMENT_CHAR * len(tok.decode(partial))
    assert detok.text == tok.decode(tok.encode("ok") + partial)


def test_text_before_incomplete_character_is_released(mixed_tok: Tokenizer) -> None:
    ids = mixed_tok.encode("a 日本")
    assert mixed_tok.decode([ids[1]]) == " " + REPLACEMENT_CHAR
    detok = IncrementalDetokenizer(mixed_tok, [])
    assert [detok.update([i]) for i in ids] == ["a", " ", "", "日", "", "", "本"]
    stopped = IncrementalDetokenizer(mixed_tok, [], stop=[" "])
    assert stopped.update(ids) == "a"
    assert stopped.output_token_ids == ids[:2]  # found at the token that completes it


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("hello world, goodbye")
    pieces = [tok.decode([i]) for i in ids]
    stop = "lo wor"
    assert not any(stop in p for p in pieces)  # the stop string really spans several tokens
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    deltas = [detok.update([i]) for i in ids]
    assert "".join(deltas) == detok.text == "hel"
    assert detok.finished_by_stop == stop
    completing = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
    assert detok.output_token_ids == ids[:completing]
    assert detok.update(tok.encode("more")) == "" and detok.flush() == ""
    assert detok.output_token_ids == ids[:completing]


def test_stop_string_at_very_beginning(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("Q: "), stop=["hel"])
    assert detok.update(tok.encode("hello world")) == ""
    assert detok.finished_by_stop == "hel" and detok.text == ""


def test_earlier_stop_string_in_text_wins(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four")
    for stops in (["four", "two"], ["two", "four"]):
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        assert detok.update(ids) == "one "
        assert detok.finished_by_stop == "two"
    # Overlapping stop strings: the one complete first wins, then the longer one.
    for stops, text, stop in ((["one two three", "two"], "one ", "two"),
                              (["three", "two three"], "one ", "two three")):
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        assert detok.update(ids) == text and detok.finished_by_stop == stop


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["wörld", "日本"], include_stop_str_in_output=True)
    ids = tok.encode(MULTIBYTE)
    deltas = [detok.update([i]) for i in ids]
    assert "".join(deltas) == detok.text == "héllo wörld"
    assert detok.finished_by_stop == "wörld"


def test_possible_stop_prefix_held_until_resolved(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["world!"])
    assert detok.update(tok.encode("hello wor")) == "hello "  # "wor" may begin "world!"
    assert detok.update(tok.encode("m")) == "worm"  # now it cannot
    assert detok.update(tok.encode(" world")) == " "
    assert detok.flush() == "world"  # the request ended for another reason
    assert detok.text == "hello worm world" and detok.finished_by_stop is None


def test_prompt_text_never_matches_a_stop_string(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("please stop"), stop=["stop"])
    assert "".join(_stream(detok, [tok.encode(" and go on")])) == " and go on"
    assert detok.finished_by_stop is None


def test_prompt_tokens_give_context_to_first_output_token() -> None:
    """A SentencePiece-style decoder drops the leading space of the first token it sees; after a
    prompt, the first output token's space is real text."""
    pieces = ["<unk>", "▁Say", "▁Hello", "▁world"]
    backend = BackendTokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    tok = Tokenizer(backend)
    prompt, output = tok.encode("Say"), tok.encode("Hello world")
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = _stream(detok, [[i] for i in output])
    assert "".join(deltas) == tok.decode(prompt + output)[len(tok.decode(prompt)):] == " Hello world"


def test_decode_window_stays_small(tok: Tokenizer) -> None:
    """Cost per token is O(1): every decode call sees a bounded window, however long the output."""
    widths: list[int] = []

    class CountingTokenizer:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            widths.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(inspect.getsource(textwrap) + MULTIBYTE * 20)
    assert len(ids) > 3000
    detok = IncrementalDetokenizer(CountingTokenizer(), tok.encode("prompt"), stop=["never in text"])
    deltas = [detok.update([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert max(widths) <= 12
