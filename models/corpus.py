"""The training corpus of the bundled models: the running interpreter's standard-library source.

Files are split by a hash of their path relative to the standard library, so the split does not
depend on the machine or on which other files exist::

    sha256(relative path) % 20 == 0  ->  held-out (reported perplexity, never trained on)
    sha256(relative path) % 20 == 1  ->  validation (picks the best weights during training)
    otherwise                        ->  train (also the only text the tokenizer sees)

The tokenizer is byte-level BPE with two special tokens: ``<|endoftext|>`` (id 0) ends every
file in the token stream and is the models' EOS; ``<|pad|>`` (id 1) pads. Nothing is prepended.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
SPLITS = ("train", "validation", "heldout")
MAX_FILE_BYTES = 1 << 20
# Tests, the IDLE application and installed third-party packages are not the standard library's source.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


@dataclass(slots=True)
class Corpus:
    """Per split, the relative paths (sorted) and texts of its files."""

    root: str
    paths: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    texts: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    num_undecodable: int = 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 20
    return "heldout" if bucket == 0 else "validation" if bucket == 1 else "train"


def source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` that belong in the corpus, sorted."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in files:
            # _sysconfigdata is generated per build; skipping it keeps the corpus a function of the version.
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(directory, name)
            if path.stat().st_size <= MAX_FILE_BYTES:
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def load_corpus(root: Path | None = None, max_files: int | None = None) -> Corpus:
    """Read the corpus; with ``max_files``, keep the first ``max_files`` training files and the
    first ``max(1, max_files // 10)`` files of each other split (a small corpus for tests)."""
    root = root or stdlib_root()
    corpus = Corpus(root=str(root))
    limits = {s: None if max_files is None else max(1, max_files // 10) for s in SPLITS}
    limits["train"] = max_files
    for rel in source_files(root):
        split = split_of(rel)
        limit = limits[split]
        if limit is not None and len(corpus.paths[split]) >= limit:
            continue
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            corpus.num_undecodable += 1
            continue
        corpus.paths[split].append(rel)
        corpus.texts[split].append(text)
    return corpus


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train byte-level BPE on ``texts``; return a ``transformers`` fast tokenizer that adds no
    special tokens when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    assert fast.convert_tokens_to_ids(EOS_TOKEN) == 0 and fast.convert_tokens_to_ids(PAD_TOKEN) == 1
    return fast


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Every text's tokens followed by EOS, concatenated, as uint16."""
    backend = tokenizer.backend_tokenizer
    assert backend.get_vocab_size(with_added_tokens=True) <= np.iinfo(np.uint16).max + 1
    if not texts:
        return np.zeros(0, dtype=np.uint16)
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    eos = np.array([tokenizer.eos_token_id], dtype=np.uint16)
    parts = []
    for encoding in encodings:
        parts.append(np.asarray(encoding.ids, dtype=np.uint16))
        parts.append(eos)
    return np.concatenate(parts)
