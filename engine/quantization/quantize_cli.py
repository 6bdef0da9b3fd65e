"""``sluice quantize``: make an AWQ 4-bit checkpoint (AutoAWQ GEMM format) from a dense one.

    sluice quantize --model DIR --out DIR [--calib FILE] [--group-size 128] [--samples 128]
                    [--seq-len 512] [--device auto]

Calibration text is ``--calib``'s, or by default the Python standard library's source, which
every machine with Python has (no network).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models import MODEL_REGISTRY
from engine.quantization.awq import SUPPORTED_GROUP_SIZES, AWQConfig
from engine.quantization.awq_quantizer import AWQQuantizer, QuantizeSettings

logger = logging.getLogger(__name__)

_SHARD_BYTES = 4 * 2**30
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "model.safetensors.index.json", "config.json")


def stdlib_source_text(min_chars: int) -> str:
    """At least ``min_chars`` of standard-library source (or all of it), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if total >= min_chars:
            break
    return "\n".join(parts)


def calibration_batch(tokenizer, text: str, samples: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` token ids: consecutive windows of the tokenized text, at most
    ``samples`` of them (fewer if the text is short; one shorter window if shorter still)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("calibration text is empty")
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        return torch.tensor([ids])
    if n < samples:
        logger.warning("calibration text gives %d samples of %d tokens, not %d", n, seq_len, samples)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def save_awq_checkpoint(
    model, packed: dict[str, torch.Tensor], config: AWQConfig, src: Path, out: Path
) -> None:
    """Write ``model``'s weights with its decoder linears replaced by ``packed``, the config with
    its ``quantization_config`` block, and every non-weight file of ``src`` (tokenizer, ...)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if (leaf == "weight" and f"{module}.qweight" in packed) or (tied and name == "lm_head.weight"):
            continue
        state[name] = tensor.detach().contiguous()
    state.update(packed)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not any(path.match(p) for p in _WEIGHT_FILES):
            shutil.copy2(path, out / path.name)
    _write_shards(state, out)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = config.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _write_shards(state: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice quantize", description="Make an AWQ 4-bit checkpoint (AutoAWQ GEMM format) from a dense one."
    )
    parser.add_argument("--model", required=True, help="dense Hugging Face checkpoint directory")
    parser.add_argument("--out", required=True, help="where to write the AWQ checkpoint")
    parser.add_argument("--calib", help="calibration text file (default: Python standard library source)")
    parser.add_argument("--group-size", type=int, default=128, choices=SUPPORTED_GROUP_SIZES)
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--device", default="auto", help="where blocks are quantized (auto: cuda if present)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    args = build_parser().parse_args(argv)
    src, out = Path(args.model), Path(args.out)
    if args.samples < 1 or args.seq_len < 1:
        print("sluice quantize: --samples and --seq-len must be >= 1", file=sys.stderr)
        return 2
    hf_config = AutoConfig.from_pretrained(src)
    if not set(hf_config.architectures or ()) & set(MODEL_REGISTRY):
        print(f"sluice quantize: unsupported architecture {hf_config.architectures}", file=sys.stderr)
        return 2
    if getattr(hf_config, "quantization_config", None):
        print(f"sluice quantize: {src} is already quantized", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src)
    text = (Path(args.calib).read_text(encoding="utf-8", errors="replace") if args.calib
            else stdlib_source_text(8 * args.samples * args.seq_len))
    input_ids = calibration_batch(tokenizer, text, args.samples, args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", attn_implementation="sdpa").eval()
    print(f"sluice quantize: {src} -> {out}: {input_ids.shape[0]} x {input_ids.shape[1]} calibration tokens "
          f"from {args.calib or 'the standard library source'}, group size {args.group_size}, on {device}",
          file=sys.stderr)
    try:
        quantizer = AWQQuantizer(model, QuantizeSettings(group_size=args.group_size), device)
    except ValueError as e:
        print(f"sluice quantize: {e}", file=sys.stderr)
        return 2
    packed = quantizer.quantize(input_ids)
    save_awq_checkpoint(model, packed, quantizer.config, src, out)
    print(f"sluice quantize: wrote {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
