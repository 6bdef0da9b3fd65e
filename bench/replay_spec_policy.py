"""N-gram lookup and the per-request pause rule, replayed on recorded greedy outputs.

Greedy speculation never changes the tokens, so how many steps a request takes with n-gram
drafts is a function of its recorded output alone: at each step the engine's own
``ngram_lookup`` drafts from prompt + output so far, the drafts agreeing with the recorded
continuation are accepted, and ``SpeculationPolicy`` decides, as in the engine, whether the
request drafts at all. With a verify step costing ``--verify-cost`` decode steps (1.16 on this
CPU: the engine's 579 verify and 989 plain steps at 1.68x for 2,794 tokens), the speedup is
decode steps / cost. The replay reproduces the engine's counts exactly (2 / 16, 8-step 10% rule,
regenerate: 579 verify steps, 2,291 drafts, 1,226 accepted), so rules and lookup lengths can be
compared in seconds, then the chosen ones measured end to end with bench/bench_spec_decode.py.

    python -m bench.replay_spec_policy --num-prompts 22 --out bench/results/spec_decode_cpu_ngram_policy_replay.json

The recording (the bundled model, greedy, the ``heldout`` and ``regenerate`` workloads of
bench/bench_spec_decode.py) takes a few minutes on two cores; ``--recorded FILE`` reuses one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.bench_spec_decode import REPO, batch1_cpu_settings, engine_for, heldout_prompts, regenerate_items, run_single
from bench.common import write_result
from engine.spec_decode.ngram_proposer import ngram_lookup
from engine.spec_decode.policy import NGRAM_PAUSE_RULE, PauseRule, SpeculationPolicy

NO_PAUSE = PauseRule(window=1 << 30, min_acceptance=0.0)  # a window never fills: never pauses
RULES = {
    "none": NO_PAUSE,
    "draft-model rule (8 steps, 10%)": PauseRule(),
    "8 steps, 2%": PauseRule(8, 0.02),
    "8 steps, none accepted": PauseRule(8, 0.01),
    "16 steps, 3%": PauseRule(16, 0.03),
    "16 steps, none accepted (n-gram rule)": NGRAM_PAUSE_RULE,
}


def record(args: argparse.Namespace) -> dict[str, list[tuple[list[int], list[int]]]]:
    engine = engine_for(batch1_cpu_settings(args.model), args.model, "baseline")
    prompts = heldout_prompts(engine, args.num_prompts, args.prompt_tokens)
    recorded: dict[str, list[tuple[list[int], list[int]]]] = {"heldout": [], "regenerate": []}
    for i, p in enumerate(prompts):
        recorded["heldout"].append((p, run_single(engine, p, args.max_tokens)["tokens"]))
        print(f"  recorded heldout {i + 1}/{len(prompts)}", flush=True)
    for i, (p, n) in enumerate(regenerate_items(engine, prompts, args.max_tokens)):
        recorded["regenerate"].append((p, run_single(engine, p, n)["tokens"]))
        print(f"  recorded regenerate {i + 1}/{len(prompts)}", flush=True)
    return recorded


def replay(items: list[tuple[list[int], list[int]]], min_n: int, max_n: int, k: int, rule: PauseRule,
           verify_cost: float) -> dict:
    """Decode steps with and without drafts for greedy requests whose outputs are ``items``."""
    plain = cost = 0.0
    verify_steps = drafted = accepted = 0
    for index, (prompt, output) in enumerate(items):
        policy = SpeculationPolicy(None, rule)
        rid = str(index)
        plain += len(output) - 1  # the first token comes with the prompt's step
        pos = 1
        while pos < len(output):
            drafts: list[int] = []
            if policy.allows(rid):  # asked once per decode step, as the engine does
                context = np.asarray(prompt + output[:pos], dtype=np.int64)
                drafts = ngram_lookup(context, min_n, max_n, min(k, len(output) - pos - 1))
            hit = 0
            while hit < len(drafts) and drafts[hit] == output[pos + hit]:
                hit += 1
            pos += hit + 1
            if drafts:
                cost += verify_cost
                verify_steps, drafted, accepted = verify_steps + 1, drafted + len(drafts), accepted + hit
                policy.record(rid, len(drafts), hit)
            else:
                cost += 1.0
    return {"speedup": plain / cost, "decode_steps": int(plain), "verify_steps": verify_steps,
            "draft_tokens": drafted, "accepted_draft_tokens": accepted,
            "acceptance_rate": accepted / max(drafted, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sluice-pycoder"))
    parser.add_argument("--num-prompts", type=int, default=22)
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--verify-cost", type=float, default=1.16, help="a verify step, in decode steps")
    parser.add_argument("--lookups", default="1-16,2-16,1-4,2-4", help="min-max n-gram lengths to replay")
    parser.add_argument("--recorded", type=Path, help="reuse recorded outputs (JSON written by a previous run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / "spec_decode_cpu_ngram_policy_replay.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recorded:
        recorded = json.loads(args.recorded.read_text())
    else:
        recorded = record(args)
        args.out.with_suffix(".recorded.json").write_text(json.dumps(recorded))
    rows = []
    for lookup in args.lookups.split(","):
        min_n, max_n = (int(v) for v in lookup.split("-"))
        for name, rule in RULES.items():
            row = {"lookup": [min_n, max_n], "rule": name,
                   "rule_settings": None if rule is NO_PAUSE else [rule.window, rule.min_acceptance, rule.first_pause]}
            for workload, items in recorded.items():
                row[workload] = replay(items, min_n, max_n, args.k, rule, args.verify_cost)
            rows.append(row)
            print(f"lookup {min_n}..{max_n:<2} {name:40s} " + "  ".join(
                f"{w} {row[w]['speedup']:.3f}x ({row[w]['verify_steps']} verifies, "
                f"acceptance {row[w]['acceptance_rate']:.2f})" for w in recorded), flush=True)
    write_result(args.out, {"model": Path(args.model).name, "k": args.k, "verify_cost": args.verify_cost,
                            "workload_requests": {w: len(v) for w, v in recorded.items()}, "rows": rows})


if __name__ == "__main__":
    main()
