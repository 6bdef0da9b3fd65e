"""AWQ: activation-aware 4-bit weight quantization of a Llama-family checkpoint, block by block.

Per decoder block, on calibration activations X:

1. Scale search. Input channels that see large activations matter most, so before rounding each
   group of linears that share an input is rescaled per input channel by
   ``s = mean|x|^a / mean|w~|^(1-a)`` (w~: weights normalised within their quantization group),
   with ``a`` on a grid of 20 values in [0, 1) chosen to minimise the error of the block part
   that consumes them. ``1/s`` folds into the op that produces the input::

       input_layernorm          -> q, k, v   (error of the attention output)
       v_proj (if shapes allow) -> o         (error of o)
       post_attention_layernorm -> gate, up  (error of the MLP output)
       up_proj                  -> down      (error of down)

2. Clipping search. Each linear but q and k (their error is amplified by the q.k product) clips
   every (output, group) range to the shrink factor that minimises that group's output error.
3. Round to nearest with a per-group zero point and pack to the AutoAWQ GEMM format.

The block's input for the next block is the unquantized block's output. Only one block is on
the device at a time, with the calibration activations. Calibration attention is plain causal
(sliding windows are not applied: calibration sequences are short).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from engine.quantization.awq import AWQConfig, fake_quantize, quantize

_ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class QuantizeSettings:
    group_size: int = 128
    scale_grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5  # the clipping search tries ranges down to this fraction
    clip_tokens: int = 512  # calibration tokens the clipping search looks at
    batch_size: int = 8  # calibration sequences per forward


@dataclass(slots=True)
class _ScaleGroup:
    prev: nn.Module  # the norm or linear whose output feeds ``linears``
    linears: list[str]
    inspect: Callable[[torch.Tensor], torch.Tensor]  # the block part whose output error counts


class AWQQuantizer:
    """Quantizes a Hugging Face Llama-family ``model`` (its decoder blocks' linears) with AWQ.
    ``device`` is where each block runs; the model itself may stay on the CPU."""

    def __init__(
        self, model: nn.Module, settings: QuantizeSettings, device: torch.device | str = "cpu"
    ) -> None:
        self.model = model
        self.settings = settings
        self.device = torch.device(device)
        self.config = AWQConfig(group_size=settings.group_size)
        for name, linear in _linears(model.model.layers[0]).items():
            out_features, in_features = linear.weight.shape
            if in_features % self.config.group_size_for(in_features) or out_features % 8:
                raise ValueError(f"AWQ: {name} is {in_features} -> {out_features}; in_features must be a multiple "
                                 f"of the group size {settings.group_size} and out_features of 8")
        # Searches run in float32 on the CPU (fast there) and in the model's dtype on a GPU.
        self.dtype = torch.float32 if self.device.type == "cpu" else next(model.parameters()).dtype

    @torch.no_grad()
    def quantize(self, input_ids: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
        """Quantize every decoder block in place (scales folded into the norms and linears) and
        return the AWQ tensors ``{"model.layers.i.<proj>.qweight" | "qzeros" | "scales": ...}``."""
        inner = self.model.model
        hidden = self._embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=self.device)[None]
        packed: dict[str, torch.Tensor] = {}
        bar = tqdm(inner.layers, desc="AWQ", unit="layer", disable=not progress)
        for i, layer in enumerate(bar):
            original_dtype = next(layer.parameters()).dtype
            layer.to(self.device, self.dtype)
            rotary = inner.rotary_emb.to(self.device)
            pos_emb = rotary(hidden[:1], positions)
            bar.set_postfix_str("activations")
            inputs, hidden = self._block_inputs(layer, hidden, pos_emb)
            bar.set_postfix_str("scales")
            self._search_and_apply_scales(layer, inputs, pos_emb)
            bar.set_postfix_str("clipping")
            self._search_and_apply_clipping(layer, inputs)
            bar.set_postfix_str("packing")
            for name, linear in _linears(layer).items():
                qweight, qzeros, scales = quantize(linear.weight, self.config.group_size_for(linear.in_features))
                prefix = f"model.layers.{i}.{name}"
                packed[f"{prefix}.qweight"] = qweight.cpu()
                packed[f"{prefix}.qzeros"] = qzeros.cpu()
                packed[f"{prefix}.scales"] = scales.cpu()
            layer.to("cpu", original_dtype)
            del inputs
        return packed

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.model.embed_tokens
        return embed.weight[input_ids.to(embed.weight.device)].to(self.device, self.dtype)

    def _block_inputs(
        self, layer: nn.Module, hidden: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Run the block over the calibration batch: the input of each of its linears
        ``[sequences, tokens, features]``, and the block's output."""
        captured: dict[str, list[torch.Tensor]] = {}

        def capture(name: str) -> Callable:
            return lambda _module, args, _output: captured.setdefault(name, []).append(args[0])

        hooks = [linear.register_forward_hook(capture(name)) for name, linear in _linears(layer).items()]
        outputs = []
        try:
            for batch in hidden.split(self.settings.batch_size):
                out = layer(batch, attention_mask=None, position_embeddings=pos_emb)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for hook in hooks:
                hook.remove()
        # Linears that share an input (q/k/v, gate/up) share one tensor.
        inputs: dict[str, torch.Tensor] = {}
        for name, parts in captured.items():
            twin = next((n for n in inputs if captured[n][0] is parts[0]), None)
            inputs[name] = inputs[twin] if twin else torch.cat(parts)
        return inputs, torch.cat(outputs)

    def _scale_groups(
        self, layer: nn.Module, pos_emb: tuple[torch.Tensor, torch.Tensor]
    ) -> list[_ScaleGroup]:
        attn, mlp = layer.self_attn, layer.mlp

        def attention(x: torch.Tensor) -> torch.Tensor:
            return attn(hidden_states=x, position_embeddings=pos_emb, attention_mask=None)[0]

        qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        groups = [_ScaleGroup(layer.input_layernorm, qkv, attention)]
        if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
            groups.append(_ScaleGroup(attn.v_proj, ["self_attn.o_proj"], attn.o_proj))
        groups.append(_ScaleGroup(layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], mlp))
        groups.append(_ScaleGroup(mlp.up_proj, ["mlp.down_proj"], mlp.down_proj))
        return groups

    def _search_and_apply_scales(
        self, layer: nn.Module, inputs: dict[str, torch.Tensor], pos_emb: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        linears = _linears(layer)
        groups = self._scale_groups(layer, pos_emb)
        # Every search sees the original weights; the scales are applied together afterwards.
        best = [self._search_scales([linears[n] for n in g.linears], inputs[g.linears[0]], g.inspect)
                for g in groups]
        for group, scales in zip(groups, best, strict=True):
            fold_scales(group.prev, [linears[n] for n in group.linears], scales)
            scaled = inputs[group.linears[0]] / scales  # the clipping search sees the scaled inputs
            for name in group.linears:
                inputs[name] = scaled

    def _search_scales(
        self, linears: list[nn.Linear], x: torch.Tensor, inspect: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The per-input-channel scales [C] that minimise the output error of ``inspect`` when
        ``linears`` are quantized."""
        group_size = self.config.group_size_for(x.shape[-1])
        w = torch.cat([lin.weight for lin in linears]).float()
        w_groups = w.abs().view(w.shape[0], -1, group_size)
        w_mean = (w_groups / (w_groups.amax(dim=-1, keepdim=True) + 1e-6)).view_as(w).mean(dim=0)
        x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(dim=0)
        reference = self._forward(inspect, x)
        originals = [lin.weight.clone() for lin in linears]
        best_err, best_scales = float("inf"), None
        for step in range(self.settings.scale_grid):
            ratio = step / self.settings.scale_grid
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales = torch.nan_to_num(scales, nan=1.0, posinf=1.0)
            for lin, orig in zip(linears, originals, strict=True):
                scaled = orig.float() * scales
                lin.weight.copy_(fake_quantize(scaled, group_size) / scales)
            err = (self._forward(inspect, x) - reference).float().pow(2).mean().item()
            if err < best_err:
                best_err, best_scales = err, scales
        for lin, orig in zip(linears, originals, strict=True):
            lin.weight.copy_(orig)
        assert best_scales is not None, "the scale search found no finite error"
        return best_scales.to(x.dtype)

    def _forward(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(batch) for batch in x.split(self.settings.batch_size)])

    def _search_and_apply_clipping(self, layer: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        for name, linear in _linears(layer).items():
            if name.rpartition(".")[2] in _NO_CLIP:
                continue
            max_val = self._search_clip(linear.weight, inputs[name])
            w = linear.weight.view(*max_val.shape, -1)
            linear.weight.copy_(torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
                                .view_as(linear.weight))

    def _search_clip(self, weight: torch.Tensor, x: torch.Tensor, rows_per_batch: int = 256) -> torch.Tensor:
        """Per (output, group) the clip bound [N, K/G] whose quantized outputs are closest to
        the unclipped ones on a subsample of the calibration tokens."""
        s = self.settings
        group_size = self.config.group_size_for(weight.shape[1])
        x = x.reshape(-1, x.shape[-1])
        x = x[:: max(1, x.shape[0] // s.clip_tokens)].float()
        x = x.view(x.shape[0], -1, group_size)  # [T, groups, G]
        bounds = []
        for w in weight.float().split(rows_per_batch):
            w = w.view(w.shape[0], -1, group_size)  # [rows, groups, G]
            reference = torch.einsum("tgj,rgj->rtg", x, w)
            org_max = w.abs().amax(dim=-1)  # [rows, groups]
            best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
            for step in range(int(s.max_shrink * s.clip_grid)):
                max_val = org_max * (1 - step / s.clip_grid)
                clipped = torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
                q = fake_quantize(clipped.view(w.shape[0], -1), group_size).view_as(w)
                err = (torch.einsum("tgj,rgj->rtg", x, q) - reference).pow(2).mean(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_max = torch.where(better, max_val, best_max)
            bounds.append(best_max)
        return torch.cat(bounds).to(weight.dtype)


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {
        **{f"self_attn.{n}": getattr(layer.self_attn, n) for n in _ATTN_LINEARS},
        **{f"mlp.{n}": getattr(layer.mlp, n) for n in _MLP_LINEARS},
    }


def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Multiply the consumers' input channels by ``scales`` and divide the producer's output by
    them: the block computes the same function, with the salient channels enlarged."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(scales.view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(scales)
    else:  # an RMSNorm: y = weight * x / rms(x)
        prev.weight.div_(scales)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales)
    for lin in linears:
        lin.weight.mul_(scales.view(1, -1))
