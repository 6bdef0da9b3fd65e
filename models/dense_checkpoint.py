"""Dense float32 checkpoints that ``transformers`` can load, made from quantized weights: an AWQ
checkpoint dequantized as sluice's CPU path does (``(q - z) * s`` in fp16, then float32), or a
dense checkpoint with round-to-nearest 4-bit applied to its decoder linears."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.model_loader import iter_checkpoint
from engine.quantization.awq import dequantize, fake_quantize

_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def dequantized_state_dict(awq_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an AWQ checkpoint in float32, ``qweight/qzeros/scales`` triples replaced by
    the ``[out, in]`` weight they encode."""
    state = dict(iter_checkpoint(awq_dir))
    dense = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            w = dequantize(tensor, state[f"{module}.qzeros"], state[f"{module}.scales"])
            dense[f"{module}.weight"] = w.float().t().contiguous()
        elif leaf not in ("qzeros", "scales"):
            dense[name] = tensor.float()
    return dense


def rtn_state_dict(dense_dir: str | Path, group_size: int = 128) -> dict[str, torch.Tensor]:
    """A dense checkpoint in float32 with its decoder linears round-to-nearest 4-bit quantized."""
    linears = tuple(f"{p}.weight" for p in _DECODER_LINEARS)
    state = {}
    for name, tensor in iter_checkpoint(dense_dir):
        state[name] = fake_quantize(tensor.float(), group_size) if name.endswith(linears) else tensor.float()
    return state


def save_dense_checkpoint(state: dict[str, torch.Tensor], src: str | Path, out: str | Path) -> Path:
    """Write ``state`` as one float32 safetensors file beside ``src``'s tokenizer and config (its
    ``quantization_config`` dropped)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "config.json":
            shutil.copy(path, out / path.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out
