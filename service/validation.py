"""Turn a ``GenerateRequest`` into the engine's prompt, ``SamplingParams`` and cache salt.

Every check raises ``ValueError`` whose message starts with the offending field's name, which
the servicer returns as INVALID_ARGUMENT. Checks that need the tokenizer or the model's context
(``max_model_len``) are the engine's ``prepare_request``.
"""

from __future__ import annotations

import dataclasses
import uuid

from engine.sampling_params import SamplingParams
from sluice.v1 import generation_pb2 as pb

# Scalar sampling fields: ``optional`` in the proto, with SamplingParams' names (tests/test_protos.py
# checks that every SamplingParams field has one).
OPTIONAL_SAMPLING_FIELDS = tuple(
    f.name for f in dataclasses.fields(SamplingParams)
    if f.name in pb.GenerateRequest.DESCRIPTOR.fields_by_name and f.name not in ("stop", "stop_token_ids", "logit_bias")
)
# A request id travels in response metadata and log lines: short, visible ASCII, no spaces.
MAX_REQUEST_ID_CHARS = 256


def request_id_of(request: pb.GenerateRequest, required: bool = False) -> str:
    """The caller's request id, or a fresh one when it gave none and need not."""
    rid = request.request_id
    if not rid:
        if required:
            raise ValueError("request_id is required on GenerateStream")
        return uuid.uuid4().hex
    if len(rid) > MAX_REQUEST_ID_CHARS or not all("!" <= ch <= "~" for ch in rid):
        raise ValueError(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} visible ASCII characters "
                         "(no spaces or control characters)")
    return rid


def prompt_field(request: pb.GenerateRequest) -> str:
    """The name of the field that holds the prompt."""
    return "text" if request.HasField("text") else "token_ids"


def check_prompt_tokens(field: str, num_tokens: int, max_prompt_tokens: int | None) -> None:
    """The server's limit on prompt length (None: only the model's context bounds it)."""
    if max_prompt_tokens is not None and num_tokens > max_prompt_tokens:
        raise ValueError(f"{field}: the prompt is {num_tokens} tokens, more than this server's limit of "
                         f"{max_prompt_tokens} (--max-prompt-tokens)")


def prompt_of(request: pb.GenerateRequest, vocab_size: int, max_prompt_tokens: int | None = None) -> str | list[int]:
    """The prompt: ``text`` or ``token_ids``, exactly one, not empty, ids in the vocabulary and
    (for ids, counted here; text is counted once tokenized) within ``max_prompt_tokens``."""
    has_text = request.HasField("text")
    if has_text and request.token_ids:
        raise ValueError("text and token_ids: give exactly one of them, not both")
    if has_text:
        if not request.text:
            raise ValueError("text must not be empty")
        return request.text
    if not request.token_ids:
        raise ValueError("text or token_ids: the prompt is missing; give exactly one of them")
    check_prompt_tokens("token_ids", len(request.token_ids), max_prompt_tokens)
    outside = next((t for t in request.token_ids if t >= vocab_size), None)
    if outside is not None:
        raise ValueError(f"token_ids: token id {outside} is outside the vocabulary (size {vocab_size})")
    return list(request.token_ids)


def cache_salt_of(request: pb.GenerateRequest) -> str | None:
    """The request's prefix-cache salt; unset and empty both mean the shared cache."""
    return request.cache_salt or None


def sampling_params_of(request: pb.GenerateRequest, max_n: int) -> SamplingParams:
    """The request's sampling parameters; unset fields take ``SamplingParams``' defaults."""
    kwargs: dict[str, object] = {
        name: getattr(request, name) for name in OPTIONAL_SAMPLING_FIELDS if request.HasField(name)
    }
    kwargs["stop"] = list(request.stop)
    kwargs["stop_token_ids"] = list(request.stop_token_ids)
    if request.logit_bias:
        kwargs["logit_bias"] = dict(request.logit_bias)
    params = SamplingParams(**kwargs)
    if params.n > max_n:
        raise ValueError(f"n must be <= {max_n} (the server's limit), got {params.n}")
    return params
