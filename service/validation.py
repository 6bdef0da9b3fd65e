"""Turn a ``GenerateRequest`` into the engine's prompt, ``SamplingParams`` and cache salt.

Every check raises ``ValueError`` whose message starts with the offending field's name, which
the servicer returns as INVALID_ARGUMENT. Checks that need the tokenizer or the model's context
(``max_model_len``) are the engine's ``prepare_request``.
"""

from __future__ import annotations

import dataclasses

from engine.sampling_params import SamplingParams
from sluice.v1 import generation_pb2 as pb

# Scalar sampling fields: ``optional`` in the proto, with SamplingParams' names (tests/test_protos.py
# checks that every SamplingParams field has one).
OPTIONAL_SAMPLING_FIELDS = tuple(
    f.name for f in dataclasses.fields(SamplingParams)
    if f.name in pb.GenerateRequest.DESCRIPTOR.fields_by_name and f.name not in ("stop", "stop_token_ids", "logit_bias")
)


def prompt_of(request: pb.GenerateRequest, vocab_size: int) -> str | list[int]:
    """The prompt: ``text`` or ``token_ids``, exactly one, not empty, ids in the vocabulary."""
    has_text = request.HasField("text")
    if has_text and request.token_ids:
        raise ValueError("text and token_ids: give exactly one of them, not both")
    if has_text:
        if not request.text:
            raise ValueError("text must not be empty")
        return request.text
    if not request.token_ids:
        raise ValueError("text or token_ids: the prompt is missing; give exactly one of them")
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
