"""engine.tokenizer against Hugging Face transformers loading the same directory."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors
from transformers import AutoTokenizer

from engine.tokenizer import Tokenizer
from tests.tiny_models import BOS, EOS

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x  # done\n",
    "héllo wörld, naïve café — 日本語のテキスト 😀 emoji ✓",
    f"{BOS}user text{EOS} after",
    "   leading and trailing spaces   ",
    "\t\n\r mixed\u00a0whitespace",
]


def _hf(directory: Path):
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _copy(src: Path, dst: Path, config_update: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(config_update or {})
    config_file.write_text(json.dumps(config))
    return dst


def _assert_same_as_hf(directory: Path) -> None:
    ours, theirs = Tokenizer.from_pretrained(directory), _hf(directory)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.all_special_ids == theirs.all_special_ids
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)


def test_fixture_tokenizer_matches_transformers(tokenizer_dir: Path) -> None:
    _assert_same_as_hf(tokenizer_dir)
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.encode(f"{BOS}x")[0] == 0  # special-token text maps to its id, not to pieces


def test_config_special_tokens_missing_from_file_are_added(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tokenizer_dir, tmp_path / "tok", {
        "pad_token": {"content": "<|pad|>", "__type": "AddedToken"},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    })
    _assert_same_as_hf(directory)
    tok = Tokenizer.from_pretrained(directory)
    assert tok.vocab_size == 512 + 3
    assert tok.encode("a<|im_start|>b") == [*tok.encode("a"), tok.backend.token_to_id("<|im_start|>"),
                                            *tok.encode("b")]


def test_post_processor_decides_bos_not_config_flag(tokenizer_dir: Path, tmp_path: Path) -> None:
    for add_bos in (True, False):
        directory = _copy(tokenizer_dir, tmp_path / f"tok{add_bos}", {"add_bos_token": add_bos})
        backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
        )
        backend.save(str(directory / "tokenizer.json"))
        _assert_same_as_hf(directory)
        tok = Tokenizer.from_pretrained(directory)
        assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0
        assert tok.add_bos_token is add_bos


def test_chat_template_kept_raw(tokenizer_dir: Path, tmp_path: Path) -> None:
    in_config = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    directory = _copy(tokenizer_dir, tmp_path / "tok", {"chat_template": in_config})
    assert Tokenizer.from_pretrained(directory).chat_template == in_config == _hf(directory).chat_template
    in_file = "{{ messages[0]['content'] }}"
    (directory / "chat_template.jinja").write_text(in_file)
    assert Tokenizer.from_pretrained(directory).chat_template == in_file == _hf(directory).chat_template
    assert Tokenizer.from_pretrained(tokenizer_dir).chat_template is None


def test_missing_tokenizer_names_directory(tmp_path: Path) -> None:
    empty = tmp_path / "no-tokenizer-here"
    empty.mkdir()
    with pytest.raises(ValueError, match="no-tokenizer-here"):
        Tokenizer.from_pretrained(empty)
    with pytest.raises(ValueError, match="does-not-exist"):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")
