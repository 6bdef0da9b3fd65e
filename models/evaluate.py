"""Held-out perplexity of a checkpoint, through sluice's own model or through ``transformers``.

Both score the same windows, built as in training: each file's tokens followed by EOS,
concatenated; inputs ``stream[:-1]``, targets ``stream[1:]``, cut into non-overlapping windows
of ``seq_len`` (the last one shorter). Every token but the first is predicted once, in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention.backend import get_attention_backend
from engine.attention.metadata import AttentionMetadata, set_forward_context
from engine.kv_cache import allocate_kv_cache
from engine.model_config import ModelConfig
from engine.model_loader import load_model
from models.corpus import stdlib_root, token_stream

SEQ_LEN = 512


@dataclass(slots=True)
class Perplexity:
    nll: float  # mean next-token negative log-likelihood, nats
    tokens: int  # tokens predicted

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def read_files(files: Sequence[str | Path], root: Path | None = None) -> list[str]:
    """Texts of ``files``; relative paths are taken under ``root`` (default: this Python's stdlib)."""
    root = root or stdlib_root()
    return [(root / f).read_bytes().decode("utf-8") for f in files]


def heldout_windows(model_dir: str | Path, texts: Sequence[str], seq_len: int = SEQ_LEN,
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, targets)`` int64 pairs of ``texts``' EOS-separated token stream, as in training."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = torch.from_numpy(token_stream(tokenizer, list(texts)).astype("int64"))
    inputs, targets = stream[:-1], stream[1:]
    return list(zip(inputs.split(seq_len), targets.split(seq_len), strict=True))


class SluiceScorer:
    """sluice's model of a checkpoint in float32 with the reference attention backend; scores one
    window at a time as a single prefill request whose KV fills blocks ``1..n`` of the cache."""

    def __init__(self, model_dir: str | Path, seq_len: int = SEQ_LEN, block_size: int = 16) -> None:
        self.config = ModelConfig.from_pretrained(model_dir, dtype="float32", device="cpu")
        self.model = load_model(self.config)
        self.block_size = block_size
        num_blocks = -(-seq_len // block_size) + 1  # block 0 stays the null block
        self.model.bind_kv_cache(allocate_kv_cache(self.config, num_blocks, block_size))
        self.backend = get_attention_backend("torch")

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` token ids -> float32 logits ``[n, vocab]`` of one causal sequence."""
        n = ids.numel()
        positions = torch.arange(n)
        blocks = torch.arange(1, -(-n // self.block_size) + 1, dtype=torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=blocks.long()[positions // self.block_size] * self.block_size + positions % self.block_size,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([n], dtype=torch.int32),
            block_tables=blocks[None],
            max_query_len=n,
            max_seq_len=n,
        )
        with set_forward_context(metadata, self.backend):
            return self.model.compute_logits(self.model(ids, positions))


def _perplexity(logits_of, windows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Perplexity:
    total, count = 0.0, 0
    for x, y in windows:
        total += float(F.cross_entropy(logits_of(x).double(), y, reduction="sum"))
        count += y.numel()
    return Perplexity(total / count, count)


def sluice_perplexity(model_dir: str | Path, windows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Perplexity:
    return _perplexity(SluiceScorer(model_dir).logits, windows)


def transformers_perplexity(model_dir: str | Path, windows: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            ) -> Perplexity:
    """The oracle: Hugging Face ``transformers``' float32 model of a dense checkpoint."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()

    @torch.no_grad()
    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return hf(x[None], use_cache=False).logits[0].float()

    return _perplexity(logits_of, windows)


def heldout_perplexity(model_dir: str | Path, files: Sequence[str | Path], root: Path | None = None,
                       seq_len: int = SEQ_LEN) -> Perplexity:
    """Perplexity through sluice's model of ``model_dir`` (dense or AWQ) on ``files``."""
    return sluice_perplexity(model_dir, heldout_windows(model_dir, read_files(files, root), seq_len))
