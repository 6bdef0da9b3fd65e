"""Paged attention: per-step metadata, the backend interface, and its implementations."""

from engine.attention.backend import (
    AttentionBackend,
    attention_backend_names,
    get_attention_backend,
    select_attention_backend,
)
from engine.attention.metadata import AttentionMetadata, get_forward_context, set_forward_context

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "attention_backend_names",
    "get_attention_backend",
    "get_forward_context",
    "select_attention_backend",
    "set_forward_context",
]
