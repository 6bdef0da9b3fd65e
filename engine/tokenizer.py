"""The model's tokenizer, loaded from a local directory through the ``tokenizers`` library.

Encoding follows the rules Hugging Face ``transformers`` applies to a ``tokenizer.json``: its own
post-processor decides whether BOS/EOS are added (``add_bos_token`` in ``tokenizer_config.json``
does not override it), and special tokens named in ``tokenizer_config.json`` that the file lacks
are appended to the vocabulary. ``tokenizer_config.json`` is otherwise kept as raw data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")


@dataclass(slots=True)
class Tokenizer:
    backend: BackendTokenizer
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json as read
    special_tokens: dict[str, str] = field(default_factory=dict)  # name (bos_token, ...) -> text
    extra_special_tokens: list[str] = field(default_factory=list)
    chat_template: str | dict[str, str] | list[dict[str, str]] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``) from the
        local directory ``path``; raise ``ValueError`` naming it when there is no tokenizer."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"no tokenizer found in {str(directory)!r}: missing tokenizer.json")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        backend.no_truncation()
        backend.no_padding()
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

        special_tokens = {name: _token_text(config[name]) for name in NAMED_SPECIAL_TOKENS
                          if config.get(name) is not None}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        if isinstance(extra, dict):
            special_tokens.update({name: _token_text(v) for name, v in extra.items() if v is not None})
            extra = []
        extra_special_tokens = [_token_text(t) for t in extra]

        missing = [t for t in dict.fromkeys([*special_tokens.values(), *extra_special_tokens])
                   if backend.token_to_id(t) is None]
        if missing:
            backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        chat_template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():  # a separate template file takes priority over the config entry
            chat_template = template_file.read_text(encoding="utf-8")
        return cls(backend, config, special_tokens, extra_special_tokens, chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """The vocabulary entries of ``ids`` (byte-level or SentencePiece pieces, not text)."""
        return [self.backend.id_to_token(i) for i in ids]

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def add_bos_token(self) -> bool | None:
        """The config's flag as written; encoding follows tokenizer.json's post-processor."""
        return self.config.get("add_bos_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, then the extra ones, without repeats."""
        texts = dict.fromkeys([*self.special_tokens.values(), *self.extra_special_tokens])
        ids = (self.backend.token_to_id(t) for t in texts)
        return [i for i in ids if i is not None]

    def _special_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)


def _token_text(value: str | dict[str, Any]) -> str:
    # Older configs store special tokens as serialized AddedToken objects.
    return value["content"] if isinstance(value, dict) else value
