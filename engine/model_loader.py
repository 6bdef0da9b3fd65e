"""Build a model and load a Hugging Face safetensors checkpoint into it, one tensor at a time.

Checkpoint names map onto ours through the model's ``packed_modules_mapping``: separate q/k/v
(gate/up) projections land as shards of one fused parameter::

    model.layers.3.self_attn.k_proj.weight  ->  model.layers.3.self_attn.qkv_proj.weight, shard "k"
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import engine.quantization  # noqa: F401 (registers the quantized linear methods)
from engine.layers import cpu_linear
from engine.layers.linear import LinearBase
from engine.model_config import ModelConfig
from engine.models import get_model_class

# Checkpoint tensors we recompute ourselves.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(config: ModelConfig, load_format: str = "auto", cpu_onednn_linear: bool = True) -> nn.Module:
    """Build ``config``'s model on its device and dtype, load its weights, return it in eval mode.

    ``load_format="dummy"`` fills the weights with random values instead of reading the checkpoint
    (benchmarks of real shapes without real weights: speed does not depend on the values).
    ``cpu_onednn_linear``: on a CPU in float32, linears run from weights packed once (sluice's fp16
    kernel or oneDNN, engine/layers/cpu_linear.py).
    """
    with _default_dtype(config.dtype), config.device:
        model = get_model_class(config.architecture)(config)
    if load_format == "dummy":
        _init_dummy_weights(model)
    elif load_format == "auto":
        load_weights(model, config.path)
    else:
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(module)
    if (cpu_onednn_linear and config.device.type == "cpu" and config.dtype == torch.float32
            and cpu_linear.available()):
        for module in model.modules():
            if isinstance(module, LinearBase):
                module.pack_for_cpu()
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint in ``path``; raise ``ValueError``
    naming any checkpoint tensor with no parameter, or any parameter left unloaded."""
    params = dict(model.named_parameters())
    mapping: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded: dict[str, set[object]] = {}
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_checkpoint(path):
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            target, shard_id = _map_name(name, mapping)
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            weight_loader = getattr(param, "weight_loader", _default_weight_loader)
            try:
                if shard_id is None:
                    weight_loader(param, tensor)
                else:
                    weight_loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"cannot load {name}: {e}") from e
            loaded.setdefault(target, set()).add(shard_id)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected weights, e.g. {unexpected[:5]}")
    missing = [
        name
        for name, param in params.items()
        if loaded.get(name, set()) != set(getattr(param, "shard_ids", (None,)))
    ]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")


def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the safetensors files in ``path``, keeping
    at most one tensor in host memory at a time."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory {str(root)!r} not found")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(root)!r} has no safetensors weights")
    for file in files:
        with safe_open(root / file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _map_name(name: str, mapping: dict[str, tuple[str, object]]) -> tuple[str, object]:
    module, _, param_name = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf in mapping:
        fused, shard_id = mapping[leaf]
        return f"{parent}.{fused}.{param_name}", shard_id
    return name, None


def _default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            param.random_(0, 2**31 - 1, generator=generator)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
