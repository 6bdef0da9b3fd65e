"""Our Llama-family models against Hugging Face ``transformers`` in float32: full prompts in one
flattened paged batch, chunked prefill and decode through the KV cache, rope scaling, loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.attention.backend import get_attention_backend
from engine.attention.metadata import AttentionMetadata, set_forward_context
from engine.kv_cache import allocate_kv_cache
from engine.layers.rotary import compute_inv_freq
from engine.model_config import ModelConfig
from engine.model_loader import load_model
from tests.tiny_models import FAMILIES, build_model

ATOL = RTOL = 1e-5


def _hf_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


class PagedModel:
    """Our model with a paged KV cache, each request owning random non-contiguous blocks."""

    def __init__(self, path: Path, block_size: int, num_blocks: int = 128, seed: int = 0) -> None:
        self.config = ModelConfig.from_pretrained(path)
        self.model = load_model(self.config)
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(self.config, num_blocks, block_size)
        self.model.bind_kv_cache(self.kv_caches)
        self.free_blocks = list(range(1, num_blocks))  # block 0 stays the null block
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.backend = get_attention_backend("torch")

    def step(self, chunks: dict[str, tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        """Run ``request -> (start_position, new tokens)`` as one flattened batch; return each
        request's logits for its new tokens. Metadata is built token by token (the oracle)."""
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        for rid, (start, tokens) in chunks.items():
            table = self.block_tables.setdefault(rid, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free_blocks.pop())
            for i, tok in enumerate(tokens):
                pos = start + i
                ids.append(tok)
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(start + len(tokens))
            tables.append(table)
        width = max(len(t) for t in tables)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            max_query_len=max(len(c[1]) for c in chunks.values()),
            max_seq_len=max(seq_lens),
        )
        with torch.inference_mode(), set_forward_context(metadata, self.backend):
            logits = self.model.compute_logits(self.model(torch.tensor(ids), torch.tensor(positions)))
        return dict(zip(chunks, logits.split([len(c[1]) for c in chunks.values()]), strict=True))


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def hf_models(tiny_models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {family: _hf_model(path) for family, path in tiny_models.items()}


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_flattened_prefill_matches_transformers(family: str, block_size: int, tiny_models, hf_models) -> None:
    prompts = _prompts([1, 5, 16, 23, 37])
    paged = PagedModel(tiny_models[family], block_size)
    logits = paged.step({f"r{i}": (0, p) for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        expected = _hf_logits(hf_models[family], prompt)
        torch.testing.assert_close(logits[f"r{i}"], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_match_transformers(family: str, tiny_models, hf_models) -> None:
    """Requests advance by prefill chunks of 7, then one token per step, batched together in
    whatever phase each is in; every position's logits equal the full-sequence logits."""
    sequences = _prompts([9, 20, 34], seed=1)
    prompt_lens = [3, 15, 24]
    paged = PagedModel(tiny_models[family], block_size=4, seed=1)
    done = [0] * len(sequences)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(sequences))}
    while any(d < len(s) for d, s in zip(done, sequences, strict=True)):
        chunks = {}
        for i, seq in enumerate(sequences):
            if done[i] < len(seq):
                n = min(7, prompt_lens[i] - done[i]) if done[i] < prompt_lens[i] else 1
                chunks[f"r{i}"] = (done[i], seq[done[i] : done[i] + n])
        for rid, out in paged.step(chunks).items():
            i = int(rid[1:])
            got[i].append(out)
            done[i] += out.shape[0]
    for i, seq in enumerate(sequences):
        torch.testing.assert_close(
            torch.cat(got[i]), _hf_logits(hf_models[family], seq), atol=ATOL, rtol=RTOL
        )


def test_sliding_window_never_reads_freed_blocks(tiny_models, hf_models) -> None:
    """Mistral (window 16): once a block is wholly outside the window its table entry becomes
    the null block 0, filled with NaN; decoding still matches transformers."""
    seq = _prompts([45], seed=2)[0]
    paged = PagedModel(tiny_models["mistral"], block_size=4, seed=2)
    assert paged.config.sliding_window == 16
    for k_cache, v_cache in paged.kv_caches:
        k_cache[0] = float("nan")
        v_cache[0] = float("nan")
    outs = [paged.step({"r": (0, seq[:20])})["r"]]
    for pos in range(20, len(seq)):
        table = paged.block_tables["r"]
        for b in range((pos - 16 + 1) // 4):  # blocks below the oldest visible position
            table[b] = 0
        outs.append(paged.step({"r": (pos, [seq[pos]])})["r"])
    assert paged.block_tables["r"][:6] == [0] * 6
    torch.testing.assert_close(torch.cat(outs), _hf_logits(hf_models["mistral"], seq), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_matches_transformers(rope_parameters, tmp_path: Path, tokenizer_dir: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = build_model(tmp_path / "m", "llama", tokenizer_dir, rope_parameters=rope_parameters)
    config = ModelConfig.from_pretrained(path)
    assert config.rope_scaling is not None
    assert config.rope_scaling["rope_type"] == rope_parameters["rope_type"]
    hf = _hf_model(path)
    expected_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf.config)
    ours = compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.equal(ours, expected_inv_freq)
    prompt = _prompts([90], seed=3)[0]
    logits = PagedModel(path, block_size=16).step({"r": (0, prompt)})["r"]
    torch.testing.assert_close(logits, _hf_logits(hf, prompt), atol=ATOL, rtol=RTOL)


def test_legacy_rope_scaling_keys_are_read(tmp_path: Path, llama_dir: Path) -> None:
    """Checkpoints written before rope_parameters carry rope_theta and rope_scaling{type}."""
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 50000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unsupported_rope_type_is_rejected(tmp_path: Path, llama_dir: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_pretrained(tmp_path)


def test_config_fields_per_family(tiny_models: dict[str, Path]) -> None:
    configs = {family: ModelConfig.from_pretrained(path) for family, path in tiny_models.items()}
    assert configs["mistral"].sliding_window == 16
    assert configs["qwen2"].sliding_window is None  # use_sliding_window is false
    assert configs["qwen2"].attention_bias and not configs["qwen2"].o_proj_bias
    assert configs["qwen2"].tie_word_embeddings
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32
    assert configs["llama"].head_dim == 16 and configs["llama"].num_kv_heads == 2
    for config in configs.values():
        assert config.dtype == torch.float32 and config.device == torch.device("cpu")
        assert config.eos_token_ids == (1,) and config.bos_token_id == 0
        assert config.max_model_len == 512


def test_max_model_len_is_capped_by_the_model(llama_dir: Path) -> None:
    assert ModelConfig.from_pretrained(llama_dir, max_model_len=100).max_model_len == 100
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelConfig.from_pretrained(llama_dir, max_model_len=513)


def test_eos_ids_merge_config_and_generation_config(tmp_path: Path, llama_dir: Path) -> None:
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1, 9]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (1, 7, 9)


def test_dtype_override(llama_dir: Path) -> None:
    assert ModelConfig.from_pretrained(llama_dir, dtype="bfloat16").dtype == torch.bfloat16


def test_missing_directory_or_config_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_unsupported_architecture_is_named(tmp_path: Path, llama_dir: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_pretrained(tmp_path)


def test_sharded_checkpoint_loads_like_transformers(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = build_model(tmp_path / "sharded", "qwen3", tokenizer_dir, seed=5, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    prompt = _prompts([12], seed=4)[0]
    logits = PagedModel(path, block_size=4).step({"r": (0, prompt)})["r"]
    torch.testing.assert_close(logits, _hf_logits(_hf_model(path), prompt), atol=ATOL, rtol=RTOL)


def test_tied_embeddings_share_one_tensor(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["qwen2"]
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = load_model(ModelConfig.from_pretrained(path))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors")
    return dst


def test_missing_weight_is_a_value_error(tmp_path: Path, llama_dir: Path) -> None:
    def drop(weights: dict[str, torch.Tensor]) -> None:
        del weights["model.layers.1.self_attn.v_proj.weight"]

    path = _copy_with_weights(llama_dir, tmp_path / "m", drop)
    with pytest.raises(ValueError, match="missing.*layers.1.self_attn.qkv_proj.weight"):
        load_model(ModelConfig.from_pretrained(path))


def test_unexpected_weight_is_a_value_error(tmp_path: Path, llama_dir: Path) -> None:
    def add(weights: dict[str, torch.Tensor]) -> None:
        weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    path = _copy_with_weights(llama_dir, tmp_path / "m", add)
    with pytest.raises(ValueError, match="unexpected.*mlp.extra.weight"):
        load_model(ModelConfig.from_pretrained(path))


def test_wrong_shape_names_the_weight(tmp_path: Path, llama_dir: Path) -> None:
    def shrink(weights: dict[str, torch.Tensor]) -> None:
        name = "model.layers.0.self_attn.k_proj.weight"
        weights[name] = weights[name][:8].clone()

    path = _copy_with_weights(llama_dir, tmp_path / "m", shrink)
    with pytest.raises(ValueError, match="k_proj.weight"):
        load_model(ModelConfig.from_pretrained(path))


def test_checkpoint_without_weights_is_a_value_error(tmp_path: Path, llama_dir: Path) -> None:
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="no safetensors"):
        load_model(ModelConfig.from_pretrained(tmp_path))
