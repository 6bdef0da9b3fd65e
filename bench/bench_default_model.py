"""The bundled default model on this machine: held-out perplexity through sluice (dense, AWQ,
round-to-nearest 4-bit, draft) against ``transformers``, the parse rate of greedy completions of
held-out function headers, and decode speed through ``engine.LLM``.

    python -m bench.bench_default_model --dense /tmp/trained/sluice-pycoder \\
        --heldout /tmp/trained/heldout_files.txt --out bench/results/default_model_cpu.json

Sections already in ``--out`` are kept unless named in ``--only``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from engine.config import EngineArgs
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from models.dense_checkpoint import dequantized_state_dict, rtn_state_dict, save_dense_checkpoint
from models.evaluate import heldout_windows, read_files, sluice_perplexity, transformers_perplexity
from models.header_completion import complete_headers, function_headers, parses

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("dense", "awq", "awq_oracle", "rtn", "draft", "parse", "speed")


def _ppl(p) -> dict:
    return {"nll": p.nll, "ppl": p.ppl, "tokens": p.tokens}


def measure_dense(args, windows) -> dict:
    ours, oracle = sluice_perplexity(args.dense, windows), transformers_perplexity(args.dense, windows)
    return {"sluice": _ppl(ours), "transformers": _ppl(oracle), "rel_diff": abs(ours.ppl - oracle.ppl) / oracle.ppl}


def measure_awq_oracle(args, windows) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dense = save_dense_checkpoint(dequantized_state_dict(args.awq), args.awq, Path(tmp))
        ours, oracle = sluice_perplexity(args.awq, windows), transformers_perplexity(dense, windows)
    return {"sluice": _ppl(ours), "transformers_dequantized": _ppl(oracle),
            "rel_diff": abs(ours.ppl - oracle.ppl) / oracle.ppl}


def measure_rtn(args, windows) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rtn = save_dense_checkpoint(rtn_state_dict(args.dense), args.dense, Path(tmp))
        return {"sluice": _ppl(sluice_perplexity(rtn, windows)), "group_size": 128}


def measure_parse(args, files) -> dict:
    headers = [h for text in read_files(files) for h in function_headers(text, 1)]
    llm = LLM(str(args.awq), num_kv_blocks=256)
    texts = complete_headers(llm, headers, args.max_tokens)
    ok = [parses(t) for t in texts]
    return {"headers": len(headers), "parsed": sum(ok), "rate": sum(ok) / len(ok), "max_tokens": args.max_tokens,
            "samples": [{"text": t, "parses": p} for t, p in zip(texts, ok)]}


def measure_speed(args) -> dict:
    llm = LLM(str(args.awq), num_kv_blocks=512, enable_prefix_caching=False, cpu_onednn_linear=args.cpu_onednn_linear)
    params = SamplingParams(temperature=0.0, max_tokens=args.speed_tokens, ignore_eos=True)
    prompts = [f"def f{i}(x):\n" for i in range(8)]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    result = {}
    for streams in (1, 8):
        start = time.perf_counter()
        outs = llm.generate(prompts[:streams], params)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"{streams}_stream_tokens_per_s"] = tokens / elapsed
    result.update(output_tokens=args.speed_tokens, torch_threads=torch.get_num_threads(),
                  load_average=os.getloadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, required=True, help="the dense target checkpoint (not bundled)")
    parser.add_argument("--awq", type=Path, default=REPO / "models" / "sluice-pycoder")
    parser.add_argument("--draft", type=Path, default=REPO / "models" / "sluice-pycoder-draft")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out file list (stdlib-relative paths)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "default_model_cpu.json")
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--cpu-onednn-linear", action=argparse.BooleanOptionalAction,
                        default=EngineArgs.cpu_onednn_linear, help="on CPU, packed linears (the engine's default)")
    args = parser.parse_args()
    listed = args.heldout.read_text().split()
    files = [f for f in listed if _exists(f)]
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.pop("environment", None)
    result["heldout_files"] = {"listed": len(listed), "used": files, "missing": sorted(set(listed) - set(files))}
    windows = heldout_windows(args.dense, read_files(files))
    measures = {"dense": lambda: measure_dense(args, windows),
                "awq": lambda: {"sluice": _ppl(sluice_perplexity(args.awq, windows))},
                "awq_oracle": lambda: measure_awq_oracle(args, windows),
                "rtn": lambda: measure_rtn(args, windows),
                "draft": lambda: {"sluice": _ppl(sluice_perplexity(args.draft, windows))},
                "parse": lambda: measure_parse(args, files), "speed": lambda: measure_speed(args)}
    for name in args.only.split(","):
        start = time.perf_counter()
        result[name] = measures[name]()
        result[name]["seconds"] = time.perf_counter() - start
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "samples"}), flush=True)
        write_result(args.out, result)


def _exists(relative: str) -> bool:
    from models.corpus import stdlib_root

    return (stdlib_root() / relative).is_file()


if __name__ == "__main__":
    main()
