"""What the engine needs to know about a model, resolved once from a local Hugging Face directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.models import MODEL_REGISTRY

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """A model's shape and numerics. ``rope_scaling`` is None for plain RoPE, else a dict with a
    normalized ``rope_type`` key ("linear" or "llama3") and that type's parameters."""

    path: str
    name: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    sliding_window: int | None
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q, k and v projections
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    quantization_config: dict[str, Any] | None
    torch_dtype: str | None  # the checkpoint's dtype, informational

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str = "auto",
        max_model_len: int | None = None,
        device: str | torch.device = "auto",
        quantization: str | None = None,
    ) -> ModelConfig:
        root = Path(path)
        config_file = root / "config.json"
        if not root.is_dir():
            raise ValueError(f"model directory {str(root)!r} not found")
        if not config_file.is_file():
            raise ValueError(f"model directory {str(root)!r} has no config.json")
        cfg = json.loads(config_file.read_text())
        architecture = _architecture(cfg)
        model_type = cfg.get("model_type", "")
        num_heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope(cfg)
        resolved_device = _device(device)
        return cls(
            path=str(root),
            name=cfg.get("_name_or_path") or root.name,
            architecture=architecture,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            sliding_window=_sliding_window(cfg, architecture),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=_qkv_bias(cfg, architecture),
            o_proj_bias=_o_proj_bias(cfg, architecture),
            mlp_bias=architecture == "LlamaForCausalLM" and bool(cfg.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            eos_token_ids=_eos_token_ids(cfg, root),
            bos_token_id=cfg.get("bos_token_id"),
            max_model_len=_max_model_len(cfg, max_model_len),
            dtype=_dtype(dtype, resolved_device),
            device=resolved_device,
            quantization_config=_quantization_config(cfg, root, quantization),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch
    raise ValueError(
        f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: {', '.join(MODEL_REGISTRY)}"
    )


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # Older checkpoints write rope_theta + rope_scaling; newer ones one rope_parameters dict.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return theta, {"rope_type": rope_type, **params}


def _sliding_window(cfg: dict[str, Any], architecture: str) -> int | None:
    window = cfg.get("sliding_window")
    if architecture == "LlamaForCausalLM" or window is None:
        return None
    if architecture == "MistralForCausalLM":
        return int(window)
    # Qwen: the window applies only when use_sliding_window, and only to layers >= max_window_layers.
    if not cfg.get("use_sliding_window", False):
        return None
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
        for i in range(cfg["num_hidden_layers"])
    ]
    if all(t == "sliding_attention" for t in layer_types):
        return int(window)
    if all(t == "full_attention" for t in layer_types):
        return None
    raise ValueError("models that mix sliding-window and full-attention layers are not supported")


def _qkv_bias(cfg: dict[str, Any], architecture: str) -> bool:
    if architecture == "Qwen2ForCausalLM":
        return True
    if architecture == "MistralForCausalLM":
        return False
    return bool(cfg.get("attention_bias", False))


def _o_proj_bias(cfg: dict[str, Any], architecture: str) -> bool:
    if architecture in ("Qwen2ForCausalLM", "MistralForCausalLM"):
        return False
    return bool(cfg.get("attention_bias", False))


def _eos_token_ids(cfg: dict[str, Any], root: Path) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [cfg]
    gen_file = root / "generation_config.json"
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()))
    for source in sources:
        eos = source.get("eos_token_id")
        for tid in eos if isinstance(eos, list) else [eos]:
            if tid is not None and tid not in ids:
                ids.append(int(tid))
    return tuple(ids)


def _max_model_len(cfg: dict[str, Any], user_value: int | None) -> int:
    limit = int(cfg.get("max_position_embeddings") or 0) or None
    if user_value is None:
        if limit is None:
            raise ValueError("config.json has no max_position_embeddings; pass max_model_len")
        return limit
    if user_value < 1:
        raise ValueError(f"max_model_len must be >= 1, got {user_value}")
    if limit is not None and user_value > limit:
        raise ValueError(f"max_model_len {user_value} exceeds the model's max_position_embeddings {limit}")
    return user_value


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _quantization_config(cfg: dict[str, Any], root: Path, forced: str | None) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` (or AutoAWQ's older ``quant_config.json``);
    ``forced`` (``--quantization``) must agree with what the checkpoint holds."""
    qcfg = cfg.get("quantization_config")
    legacy = root / "quant_config.json"
    if qcfg is None and legacy.is_file():
        qcfg = {"quant_method": "awq", **json.loads(legacy.read_text())}
    if forced is None:
        return qcfg
    if forced != "awq":
        raise ValueError(f"quantization must be 'awq' or unset, got {forced!r}")
    if qcfg is None:
        raise ValueError(f"quantization 'awq' was asked for but {str(root)!r} has no quantization_config")
    method = str(qcfg.get("quant_method", "awq")).lower()
    if method != "awq":
        raise ValueError(f"quantization 'awq' was asked for but the checkpoint is quantized with {method!r}")
    return {**qcfg, "quant_method": "awq"}
