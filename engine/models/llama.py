"""The Llama family in one module: Llama 2/3, Mistral (sliding window), Qwen2/2.5 (qkv bias),
Qwen3 (per-head q/k RMSNorm). The differences are flags of ``ModelConfig``.

The model runs on a flattened batch: ``input_ids`` and ``positions`` are ``[num_tokens]``,
the new tokens of all scheduled requests concatenated, no padding. Attention finds which
request each token belongs to, and where its KV lives, in the forward context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.attention.metadata import get_forward_context
from engine.kernels.decode_attention import DecodeSplits
from engine.kernels.rotary import rope_and_cache, rope_and_cache_partials
from engine.layers.activation import SiluAndMul
from engine.layers.linear import FusedLinear, LinearBase
from engine.layers.norm import RMSNorm
from engine.layers.partials import SplitKPartials
from engine.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from engine.model_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, prefix: str) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_window
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = FusedLinear(
            config.hidden_size,
            {"q": q_size, "k": kv_size, "v": kv_size},
            bias=config.attention_bias,
            quantization_config=config.quantization_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = LinearBase(
            q_size,
            config.hidden_size,
            bias=config.o_proj_bias,
            quantization_config=config.quantization_config,
            prefix=f"{prefix}.o_proj",
        )
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary = rotary
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # bound by the runner

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``norm(hidden + residual)`` (the first layer: ``norm(hidden)``), the add and
        the norm inside the qkv projection where it can; returns the output and the residual sum."""
        num_tokens = hidden.shape[0]
        assert self.kv_cache is not None, "KV cache not bound: call bind_kv_cache() first"
        context = get_forward_context()
        # On CUDA with a backend that takes the cache written for it, one kernel does the q/k
        # norm, rotary and that write; it also adds up the projection's split-K partials.
        fused = hidden.is_cuda and context.backend.accepts_cached_kv
        qkv, residual = self.qkv_proj.forward_normed(hidden, residual, norm, partials=fused)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
        if isinstance(qkv, SplitKPartials):
            q = rope_and_cache_partials(positions, qkv.partials, qkv.dtype, self.num_heads, self.num_kv_heads,
                                        self.rotary.cos_cache, self.rotary.sin_cache, *self.kv_cache,
                                        context.metadata.slot_mapping, *norms)
            k = v = None
        else:
            q, k, v = qkv.split(list(self.qkv_proj.output_sizes.values()), dim=-1)
            q = q.view(num_tokens, self.num_heads, self.head_dim)
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            if fused:
                rope_and_cache(positions, q, k, v, self.rotary.cos_cache, self.rotary.sin_cache, *self.kv_cache,
                               context.metadata.slot_mapping, *norms)
                k = v = None
            else:
                if self.qk_norm:
                    q, k = self.q_norm(q), self.k_norm(k)
                q, k = self.rotary(positions, q, k)
        # A decode step's attention may come back as its splits' partials: the o projection
        # combines them (in its kernel where it can).
        out = context.backend.forward(
            self, q, k, v, self.kv_cache, context.metadata, self.scale, self.sliding_window, leave_splits=True
        )
        if isinstance(out, DecodeSplits):
            return self.o_proj.forward_decode_splits(out), residual
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim)), residual


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = FusedLinear(
            config.hidden_size,
            {0: size, 1: size},
            bias=config.mlp_bias,
            quantization_config=config.quantization_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = LinearBase(
            size,
            config.hidden_size,
            bias=config.mlp_bias,
            quantization_config=config.quantization_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act = SiluAndMul()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP of ``norm(hidden + residual)``, as attention's; returns the output and the sum.
        The activation goes where the linears fuse it: summing the gate/up projection's split-K
        partials (AWQ, 1-16 tokens) or into the down projection's loads (a one-token GEMV)."""
        gate_up, residual = self.gate_up_proj.forward_normed(hidden, residual, norm, partials=True)
        if isinstance(gate_up, SplitKPartials):
            return self.down_proj(self.act(gate_up)), residual
        return self.down_proj.forward_gated(gate_up, self.act), residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` is the previous layer's MLP output and ``residual`` the stream it adds to
        (None in the first layer, whose ``hidden`` is the embedding); returns this layer's pair.
        Each residual add happens inside the norm after it, and each norm inside the linear after
        it where the linear can take it (one token through a 16-bit GEMV whose programs each hold
        their whole weight slab: engine/kernels/gemv.py).

        Elementwise launches per layer and step on GPU, besides the linears and attention: 2 fused
        add + RMSNorm (none where the linears take them), 1 kernel for q/k norm, rotary and the
        cache write, SiLU-and-mul (inside the down projection's GEMV for one token), where the
        torch code launched 36 (52 for Qwen3) in bf16 (RMSNorm 8 each, residual add 1 each,
        rotary 16, SiLU-and-mul 2)."""
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm)
        return self.mlp(hidden, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Passing the weight skips nn.Embedding's random init: the loader overwrites it anyway.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(
            config.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary, f"model.layers.{i}") for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Checkpoint projection -> (our fused projection, shard id).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # The output projection stays dense in quantized checkpoints.
        self.lm_head = LinearBase(config.hidden_size, config.vocab_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[num_tokens]`` ids and positions -> final hidden states ``[num_tokens, hidden]``."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states at the sampled positions ``[n, hidden]`` -> logits ``[n, vocab]`` in the
        model's dtype: the samplers widen them where they compute (a float32 copy of 256 rows of
        a 152k vocabulary is 155 MB written a step that the fast sampling paths never need)."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[LlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give each layer its (k_cache, v_cache)."""
        layers = self.attention_layers()
        assert len(kv_caches) == len(layers), f"{len(kv_caches)} caches for {len(layers)} layers"
        for layer, cache in zip(layers, kv_caches, strict=True):
            layer.kv_cache = cache
