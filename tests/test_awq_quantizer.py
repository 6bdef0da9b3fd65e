"""``sluice quantize`` (our AWQ) against AutoAWQ's quantizer on a tiny Llama trained here: held-out
perplexity, loading in sluice and in AutoAWQ's loader, greedy parity with Hugging Face on the
dequantized weights, and the CLI's progress and output files."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from engine.quantization.awq import AWQConfig, dequantize, quantize
from engine.quantization.awq_quantizer import fold_scales
from engine.quantization.quantize_cli import (
    calibration_batch,
    main,
    save_awq_checkpoint,
    stdlib_source_text,
)
from tests.test_awq_format import dequantized_checkpoint, hf_greedy, sluice_greedy
from tests.tiny_models import corpus_texts

with warnings.catch_warnings(record=True):  # AutoAWQ announces its deprecation on import
    import awq.modules.linear.gemm as autoawq_gemm
    from awq import AutoAWQForCausalLM
    from awq.models._config import AwqConfig
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    from awq.utils.packing_utils import dequantize_gemm

GROUP_SIZE = 128
SAMPLES, SEQ_LEN = 16, 128  # calibration, the same for both quantizers
OUTLIER_GAIN, OUTLIER_CHANNELS = 16.0, 8


def _train_tiny_llama(out: Path, tokenizer_dir: Path, steps: int = 200) -> Path:
    """A 2-block Llama (hidden 128) trained on standard-library source for a few hundred steps,
    then given LLM-like outlier channels: the OUTLIER_CHANNELS input channels of each norm ->
    linears pair that carry the most signal get norm weights OUTLIER_GAIN times larger and
    weight columns as much smaller. The function is unchanged; what changes is what AWQ exists
    for: salient channels with large activations and small weights, which round-to-nearest
    loses. (A model trained for seconds does not grow them by itself.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor(tokenizer("\n".join(corpus_texts()), add_special_tokens=False)["input_ids"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN, (8,), generator=gen)
        batch = torch.stack([ids[s:s + SEQ_LEN] for s in starts])
        model(batch, labels=batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    pairs = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        pairs += [(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))]
    magnitude = {}
    hooks = [norm.register_forward_hook(lambda m, _a, out: magnitude.__setitem__(m, out.abs().mean((0, 1))))
             for norm, _ in pairs]
    with torch.no_grad():
        model(ids[: 4 * SEQ_LEN].view(4, SEQ_LEN))
        for hook in hooks:
            hook.remove()
        for norm, linears in pairs:
            signal = magnitude[norm] * torch.cat([lin.weight for lin in linears]).norm(dim=0)
            channels = signal.topk(OUTLIER_CHANNELS).indices
            norm.weight[channels] *= OUTLIER_GAIN
            for lin in linears:
                lin.weight[:, channels] /= OUTLIER_GAIN
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def _cpu_copies():
    """AutoAWQ saves weights before each scale trial with ``t.cpu()``, a copy on a GPU but the
    live tensor itself on the CPU, so its trials would pile up; make ``cpu()`` copy as on a GPU."""
    original = torch.Tensor.cpu

    def copying_cpu(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = original(t, *args, **kwargs)
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    torch.Tensor.cpu = copying_cpu
    try:
        yield
    finally:
        torch.Tensor.cpu = original


def _quantize_with_autoawq(src: Path, out: Path, windows: list[list[int]]) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoAWQForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32, device_map="cpu")
    with _cpu_copies(), contextlib.redirect_stderr(io.StringIO()):
        model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": GROUP_SIZE, "w_bit": 4,
                                                "version": "GEMM"},
                       calib_data=windows, max_calib_samples=len(windows), max_calib_seq_len=SEQ_LEN)
        model.save_quantized(str(out))
    tokenizer.save_pretrained(out)
    return out


def _round_to_nearest(src: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            packed.update(zip((f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"),
                              quantize(module.weight, GROUP_SIZE), strict=True))
    save_awq_checkpoint(model, packed, AWQConfig(group_size=GROUP_SIZE), src, out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """The trained float model and its sluice-AWQ, AutoAWQ and round-to-nearest checkpoints,
    with the log of ``sluice quantize`` (stderr) under "sluice_log"."""
    root = tmp_path_factory.mktemp("awq_quality")
    trained = _train_tiny_llama(root / "float", tokenizer_dir)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert main(["--model", str(trained), "--out", str(root / "sluice"), "--samples", str(SAMPLES),
                     "--seq-len", str(SEQ_LEN), "--group-size", str(GROUP_SIZE)]) == 0
    from transformers import AutoTokenizer

    # AutoAWQ calibrates on the very token windows that sluice quantize took by default.
    text = stdlib_source_text(8 * SAMPLES * SEQ_LEN)
    windows = calibration_batch(AutoTokenizer.from_pretrained(trained), text, SAMPLES, SEQ_LEN).tolist()
    return {
        "float": trained,
        "sluice": root / "sluice",
        "autoawq": _quantize_with_autoawq(trained, root / "autoawq", windows),
        "rtn": _round_to_nearest(trained, root / "rtn"),
        "sluice_log": log.getvalue(),
    }


def _perplexity(model_dir: Path, tokenizer_dir: Path, tmp: Path) -> float:
    """Perplexity on held-out text (difflib's source: not in training or calibration), with an
    AWQ checkpoint's weights dequantized into a Hugging Face model."""
    import difflib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_dir / "config.json").read_text().find("quantization_config") >= 0:
        model_dir = dequantized_checkpoint(model_dir, tmp / f"{model_dir.name}_dense")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor(tokenizer(inspect.getsource(difflib), add_special_tokens=False)["input_ids"][:4096])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        x = ids.view(-1, 512)
        return math.exp(model(x, labels=x).loss.item())


def test_awq_perplexity_close_to_autoawq_and_far_better_than_round_to_nearest(
    checkpoints: dict, tokenizer_dir: Path, tmp_path: Path
) -> None:
    ppl = {k: _perplexity(checkpoints[k], tokenizer_dir, tmp_path) for k in ("float", "sluice", "autoawq", "rtn")}
    excess = {k: ppl[k] - ppl["float"] for k in ppl}
    assert ppl["sluice"] <= 1.02 * ppl["autoawq"], ppl
    assert excess["rtn"] > 0.01 * ppl["float"], f"round-to-nearest should visibly hurt here: {ppl}"
    assert excess["sluice"] <= 0.5 * excess["rtn"], ppl
    assert excess["autoawq"] <= 0.5 * excess["rtn"], ppl


@pytest.mark.parametrize("maker", ["sluice", "autoawq"])
def test_quantized_checkpoint_greedy_matches_transformers_dequantized(
    maker: str, checkpoints: dict, tmp_path: Path
) -> None:
    quantized = checkpoints[maker]
    dense = dequantized_checkpoint(quantized, tmp_path / "dense")
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (3, 20)]
    assert sluice_greedy(quantized, prompts, 12) == hf_greedy(dense, prompts, 12)


@pytest.mark.filterwarnings("ignore:Using naive")
def test_sluice_checkpoint_runs_in_autoawq(checkpoints: dict, tmp_path: Path, monkeypatch) -> None:
    """AutoAWQ's loader (its quantized-module swap and checkpoint dispatch; the CPU kernel check
    of ``from_quantized`` skipped) takes our checkpoint, and its modules compute the same logits
    as the dequantized weights in Hugging Face."""
    from accelerate.big_modeling import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = checkpoints["sluice"]
    config = AutoConfig.from_pretrained(path)
    awq_cls = AWQ_CAUSAL_LM_MODEL_MAP[config.model_type]
    quant_config = AwqConfig.from_pretrained(str(path))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    with contextlib.redirect_stderr(io.StringIO()):
        awq_cls._load_quantized_modules(awq_cls, model, quant_config, quant_config.version,
                                        use_exllama=False, use_exllama_v2=False, use_ipex=False)
    load_checkpoint_and_dispatch(model, checkpoint=str(path / "model.safetensors"), device_map={"": "cpu"},
                                 no_split_module_classes=[awq_cls.layer_type], dtype=torch.float16)
    modules = [m for m in model.modules() if isinstance(m, autoawq_gemm.WQLinear_GEMM)]
    assert len(modules) == 7 * config.num_hidden_layers
    for m in modules:
        assert torch.equal(dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, GROUP_SIZE),
                           dequantize(m.qweight, m.qzeros, m.scales))

    monkeypatch.setattr(autoawq_gemm, "TRITON_AVAILABLE", False)  # its plain dequantize + matmul
    dense = AutoModelForCausalLM.from_pretrained(dequantized_checkpoint(path, tmp_path / "dense"))
    x = torch.randint(2, 512, (1, 40))
    with torch.no_grad():
        ours, theirs = dense(x).logits, model(x).logits.float()
    torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0.01)


def test_quantize_cli_progress_config_and_files(checkpoints: dict) -> None:
    log = checkpoints["sluice_log"]
    assert "standard library source" in log
    assert "AWQ: 100%" in log and "2/2" in log  # one step per decoder block
    out, src = checkpoints["sluice"], checkpoints["float"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE,
                                             "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((src / "config.json").read_text()).get("quantization_config") is None


def test_calibration_windows_are_consecutive_token_ids(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = stdlib_source_text(20_000)
    batch = calibration_batch(tokenizer, text, samples=3, seq_len=64)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert batch.shape == (3, 64) and batch.flatten().tolist() == ids[:192]
    assert calibration_batch(tokenizer, "def f(): pass", samples=4, seq_len=64).shape[0] == 1


def test_folded_scales_keep_the_block_function() -> None:
    """Dividing a norm's (or a linear's) outputs by s and multiplying its consumers' inputs by s
    leaves the block's output unchanged."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).double()
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 2)
        layer.post_attention_layernorm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    pos = LlamaRotaryEmbedding(config)(x, torch.arange(10)[None])
    with torch.no_grad():
        before = layer(x, position_embeddings=pos)
        attn, mlp = layer.self_attn, layer.mlp
        fold_scales(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], torch.rand(64).double() + 0.5)
        fold_scales(attn.v_proj, [attn.o_proj], torch.rand(64).double() + 0.5)
        fold_scales(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], torch.rand(64).double() + 0.5)
        fold_scales(mlp.up_proj, [mlp.down_proj], torch.rand(128).double() + 0.5)
        after = layer(x, position_embeddings=pos)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
