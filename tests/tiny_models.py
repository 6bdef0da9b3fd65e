"""Tiny Llama-family checkpoints and a real byte-level BPE tokenizer, built locally for tests.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on standard-library source
text, and the models are random ``transformers`` models saved with ``save_pretrained``.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BOS, EOS = "<|bos|>", "<|eos|>"


def corpus_texts() -> list[str]:
    """Local training text: source of a few standard-library modules (same on every machine)."""
    import argparse
    import json as json_mod
    import string

    texts = [inspect.getsource(m) for m in (textwrap, string, argparse, json_mod.encoder)]
    texts.append("héllo wörld, naïve café — 日本語のテキスト 😀 emoji ✓\n" * 8)
    return texts


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def model_config(family: str, vocab_size: int, **overrides: object):
    """A tiny config of the given family; ``initializer_range`` is large so that logits are
    peaked and greedy argmax is far from ties."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=16)
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, "tie_word_embeddings": True})
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32)
    else:
        raise ValueError(f"unknown family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_model(out_dir: Path, family: str, tokenizer_dir: Path, seed: int = 0,
                max_shard_size: str | None = None, **overrides: object) -> Path:
    """Save a random tiny model of ``family`` (with the tokenizer files beside it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = model_config(family, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    if family == "qwen2":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == cfg.model_type
    return out_dir
