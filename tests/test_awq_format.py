"""The AutoAWQ "GEMM" format: config parsing, packing, unpacking and dequantization bit-exact
against AutoAWQ's own code, fused-shard loading, and a packed checkpoint of every family whose
greedy tokens in sluice equal Hugging Face's on the same weights dequantized."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.layers.linear import DenseLinearMethod, FusedLinear, LinearBase
from engine.quantization import awq
from engine.quantization.awq import AWQConfig, AWQLinearMethod, awq_linear_method

with warnings.catch_warnings(record=True):  # AutoAWQ announces its deprecation on import
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.packing_utils import dequantize_gemm

GROUP_SIZES = [32, 64, 128, -1]


def _seed() -> int:
    """Fresh random data each run; the seed is in the test id of a failure's message."""
    return int.from_bytes(os.urandom(4), "little")


def _random_awq(k: int, n: int, group_size: int, gen: torch.Generator):
    """Random integer weights q [K, N], zero points z and fp16 scales s [K/G, N]."""
    groups = k // group_size
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (groups, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(groups, n, generator=gen) * 0.05 + 1e-3).half()
    return q, z, s


def _autoawq_pack(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group_size: int) -> WQLinear_GEMM:
    """Pack with AutoAWQ's ``from_linear``, from a linear whose weight lies exactly on the grid."""
    k, n = q.shape
    linear = nn.Linear(k, n, bias=False)
    g = torch.arange(k) // group_size
    w = (q - z[g]).float() * s[g].float()  # [K, N]
    linear.weight.data = w.t().contiguous()
    return WQLinear_GEMM.from_linear(linear, 4, group_size, scales=s.float(), zeros=z)


def _autoawq_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, WQLinear_GEMM]:
    """AutoAWQ's round-to-nearest of a weight [N, K]: its fake-quantized weight, and the module
    its ``from_linear`` packs from that."""
    quantizer = object.__new__(AwqQuantizer)  # skip its calibration set-up
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point = 4, group_size, True
    w_hat, scales, zeros = quantizer.pseudo_quantize_tensor(w.clone())
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w_hat
    packed = WQLinear_GEMM.from_linear(linear, 4, group_size, scales=scales.t().contiguous(),
                                       zeros=zeros.t().contiguous())
    return w_hat, packed


def test_config_reads_current_and_legacy_keys() -> None:
    cfg = AWQConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                               "version": "GEMM", "modules_to_not_convert": ["visual"]})
    assert cfg == AWQConfig(group_size=64, modules_to_not_convert=("visual",))
    legacy = AWQConfig.from_dict({"w_bit": 4, "q_group_size": -1, "zero_point": True, "version": "gemm"})
    assert legacy.group_size == -1 and legacy.group_size_for(4096) == 4096
    assert AWQConfig.from_dict(cfg.to_dict()) == cfg
    assert AWQConfig.from_dict({"quant_method": "awq"}).to_dict()["modules_to_not_convert"] is None


@pytest.mark.parametrize("bad", [
    {"bits": 8}, {"version": "gemv"}, {"zero_point": False}, {"group_size": 48}, {"quant_method": "gptq"},
])
def test_config_rejects_what_it_cannot_run(bad: dict) -> None:
    with pytest.raises(ValueError):
        AWQConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": 128, **bad})


def test_modules_to_not_convert_keep_layers_dense() -> None:
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32,
          "modules_to_not_convert": ["layers.1.", "o_proj"]}
    assert isinstance(awq_linear_method(qc, "model.layers.0.self_attn.qkv_proj"), AWQLinearMethod)
    assert isinstance(awq_linear_method(qc, "model.layers.1.mlp.gate_up_proj"), DenseLinearMethod)
    assert isinstance(awq_linear_method(qc, "model.layers.0.self_attn.o_proj"), DenseLinearMethod)
    fused_split = {**qc, "modules_to_not_convert": ["k_proj"]}
    with pytest.raises(ValueError, match="fuses quantized and unquantized"):
        awq_linear_method(fused_split, "model.layers.0.self_attn.qkv_proj")
    assert isinstance(awq_linear_method(fused_split, "model.layers.0.mlp.gate_up_proj"), AWQLinearMethod)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_pack_unpack_dequantize_bit_exact_with_autoawq(group_size: int) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    k, n = 256, 96
    g = k if group_size == -1 else group_size
    q, z, s = _random_awq(k, n, g, gen)
    ref = _autoawq_pack(q, z, s, g)

    assert torch.equal(awq.pack_int4(q), ref.qweight), f"seed {seed}"
    assert torch.equal(awq.pack_int4(z), ref.qzeros), f"seed {seed}"
    assert torch.equal(awq.unpack_int4(ref.qweight).int(), q), f"seed {seed}"
    assert torch.equal(awq.unpack_int4(ref.qzeros).int(), z), f"seed {seed}"
    ours = awq.dequantize(ref.qweight, ref.qzeros, ref.scales)
    theirs = dequantize_gemm(ref.qweight, ref.qzeros, ref.scales, 4, g)
    assert ours.dtype == theirs.dtype == torch.float16
    assert torch.equal(ours, theirs), f"seed {seed}"


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_round_to_nearest_matches_autoawq(group_size: int) -> None:
    """Our RTN quantization equals AutoAWQ's min/max quantizer followed by its packing."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    n, k = 64, 256
    g = k if group_size == -1 else group_size
    w = torch.randn(n, k, generator=gen)
    w[:, 3] *= 20  # an outlier input channel widens its groups' ranges

    w_hat, ref = _autoawq_rtn(w, g)
    assert torch.equal(awq.fake_quantize(w, g), w_hat), f"seed {seed}"
    qweight, qzeros, our_scales = awq.quantize(w, g)
    assert torch.equal(qweight, ref.qweight), f"seed {seed}"
    assert torch.equal(qzeros, ref.qzeros), f"seed {seed}"
    assert torch.equal(our_scales, ref.scales), f"seed {seed}"


def _quant_config(group_size: int) -> dict:
    return AWQConfig(group_size=group_size).to_dict()


@pytest.mark.parametrize("group_size", [32, -1])
def test_fused_layer_concatenates_shards_along_outputs(group_size: int) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    k = 64
    sizes = {"q": 64, "k": 32, "v": 32}
    g = k if group_size == -1 else group_size
    shards = {sid: _autoawq_pack(*_random_awq(k, n, g, gen), g) for sid, n in sizes.items()}
    biases = {sid: torch.randn(n, generator=gen) for sid, n in sizes.items()}
    layer = FusedLinear(k, sizes, bias=True, quantization_config=_quant_config(group_size),
                        prefix="x.qkv_proj")
    for sid, packed in shards.items():
        for name in ("qweight", "qzeros", "scales"):
            param = getattr(layer, name)
            param.weight_loader(param, getattr(packed, name), sid)
        layer.bias.weight_loader(layer.bias, biases[sid], sid)
    layer.quant_method.process_weights_after_loading(layer)

    for name in ("qweight", "qzeros", "scales"):
        expected = torch.cat([getattr(p, name) for p in shards.values()], dim=1)
        assert torch.equal(getattr(layer, name), expected)
    w = torch.cat([awq.dequantize(p.qweight, p.qzeros, p.scales) for p in shards.values()], dim=1)
    x = torch.randn(5, k, generator=gen)
    expected = x.double() @ w.double() + torch.cat(list(biases.values())).double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_cpu_caches_dense_weight_only_when_memory_allows(monkeypatch, caplog) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    packed = _autoawq_pack(*_random_awq(128, 64, 32, gen), 32)
    x = torch.randn(3, 128, generator=gen)
    outputs = []
    for free_fraction, cached in ((0.9, True), (0.25, False)):
        monkeypatch.setattr(awq, "_cpu_cache_log", awq._CpuCacheLog())
        monkeypatch.setattr(awq, "_host_memory", lambda f=free_fraction: (2**30, int(f * 2**30)))
        layer = LinearBase(128, 64, quantization_config=_quant_config(32), prefix="mlp.down_proj")
        for name in ("qweight", "qzeros", "scales"):
            getattr(layer, name).data.copy_(getattr(packed, name))
        with caplog.at_level(logging.INFO, logger=awq.__name__):
            layer.quant_method.process_weights_after_loading(layer)
        assert (layer.dense_weight is not None) == cached
        assert ("caching dequantized weights" if cached else "too little free memory") in caplog.text
        outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1])


# --- whole checkpoints --------------------------------------------------------------------------

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_checkpoint_with_autoawq(src: Path, dst: Path, group_size: int) -> Path:
    """An AWQ checkpoint of ``src``: every decoder linear rounded to nearest by AutoAWQ's
    quantizer and packed by its ``from_linear``, written as AutoAWQ writes its checkpoints."""
    state = load_file(src / "model.safetensors")
    out = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] not in _LINEARS or leaf != "weight":
            out[name] = tensor
            continue
        g = tensor.shape[1] if group_size == -1 else group_size
        _, packed = _autoawq_rtn(tensor.float(), g)
        for part in ("qweight", "qzeros", "scales"):
            out[f"{module}.{part}"] = getattr(packed, part).contiguous()
    shutil.copytree(src, dst)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": group_size,
                                     "bits": 4, "version": "gemm", "modules_to_not_convert": None}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def dequantized_checkpoint(src: Path, dst: Path) -> Path:
    """A dense float32 copy of an AWQ checkpoint, each weight dequantized by AutoAWQ's code."""
    state = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    qc = AWQConfig.from_dict(config.pop("quantization_config"))
    out = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("qzeros", "scales"):
            continue
        if leaf == "qweight":
            g = qc.group_size_for(tensor.shape[0])
            w = dequantize_gemm(tensor, state[f"{module}.qzeros"], state[f"{module}.scales"], 4, g)
            out[f"{module}.weight"] = w.float().t().contiguous()
        else:
            out[name] = tensor.float()
    shutil.copytree(src, dst)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def sluice_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from engine import LLM, SamplingParams

    llm = LLM(str(model_dir), block_size=16, num_kv_blocks=64)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize(("family", "group_size"),
                         [("llama", 64), ("qwen2", 32), ("qwen3", -1), ("mistral", 64)])
def test_autoawq_packed_checkpoint_greedy_matches_transformers(
    family: str, group_size: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    quantized = pack_checkpoint_with_autoawq(tiny_models[family], tmp_path / "awq", group_size)
    dense = dequantized_checkpoint(quantized, tmp_path / "dense")
    gen = torch.Generator().manual_seed(_seed())
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (1, 5, 17)]
    assert sluice_greedy(quantized, prompts, 12) == hf_greedy(dense, prompts, 12)


def test_forced_awq_quantization_needs_an_awq_checkpoint(tiny_models) -> None:
    from engine.model_config import ModelConfig

    with pytest.raises(ValueError, match="quantization_config"):
        ModelConfig.from_pretrained(tiny_models["llama"], quantization="awq")
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig.from_pretrained(tiny_models["llama"], quantization="gptq")
