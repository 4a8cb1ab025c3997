"""PP choosing attention heads one by one or by whole KV group: quality, and the KV cache a decode step reads.

Under grouped-query attention a decode kernel that runs on the kept query heads
(vllm_pp/runtime/paged_attention.py) skips a KV head's cache only when all of
its query heads are pruned. PP's ``method_options.head_groups`` chooses heads
one by one ("query", the default) or by whole KV group ("kv"). This runs
`vllm-pp eval ppl`'s protocol (the first 128 contiguous 512-token windows of the
evaluation text, 8 windows per step, float32) for PP at each ratio with both
choices, on one calibration file shared by every run (`vllm-pp calibrate`,
random 512-token windows, seed 0; --num-samples 256 is the canonical protocol,
32 the first-run default). Each evaluation also counts, over every attention
decision, the KV groups left with no kept query head (an observer subclass of
PP that only counts; its decisions are PP's). Then, for SmolLM2-135M and a
LLaMA-3-8B-like shape, the share of KV-cache bytes a decode step reads:
whole-group choice kept groups / groups; per-head choice, the expectation if the
pruned heads fell at random, and the best case. Writes
benchmarks/results/head_groups_<tag>.json and prints Markdown tables.

    python benchmarks/head_groups.py [--num-samples 32] [--ratios 0.2 0.4] [--tag DATE]
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common import write_results
from first_run import SEED, SEQ_LEN, cpu_features, cpu_seconds, protocol_parser, shared_calibration

from vllm_pp.algorithm.selection import layer_ratio, num_kept_groups, num_kept_heads
from vllm_pp.methods.probe import ProbePruningMethod

RESULTS = Path(__file__).resolve().parent / "results"
# (name, decoder layers, query heads, KV heads); the first three layers are never pruned.
SHAPES = [("SmolLM2-135M", 30, 9, 3), ("LLaMA-3-8B-like", 32, 32, 8)]
SKIPPED_LAYERS = 3


class GroupCountingProbePruning(ProbePruningMethod):
    """PP, unchanged, counting the KV groups each attention decision leaves with no kept head.

    Runs in this process (the evaluation's engine is in-process), so the counts
    are read back from the class after the run.
    """

    counts = {"decisions": 0, "groups": 0, "fully_pruned_groups": 0, "kept_heads": 0, "heads": 0}

    def decide(self, block, batch, residual, probe):
        kept = super().decide(block, batch, residual, probe)
        if block.kind == "attention" and kept is not None:
            groups = block.num_units // block.group_size
            heads_per_group = torch.bincount(kept // block.group_size, minlength=groups)  # [groups]
            counts = type(self).counts
            counts["decisions"] += 1
            counts["groups"] += groups
            counts["fully_pruned_groups"] += int((heads_per_group == 0).sum())
            counts["kept_heads"] += kept.numel()
            counts["heads"] += block.num_units
        return kept


def evaluate(model: str, calibration: str, ratio: float, head_groups: str, args) -> dict:
    """PP's perplexity on the protocol's windows, with its KV-group counts and timing."""
    from vllm_pp.tools.evaluate import PerplexityRun, evaluate_perplexity
    from vllm_pp.tools.text_data import prepare_text

    run = PerplexityRun(
        model=model, text=str(prepare_text(quiet=True).evaluation), method="probe", ratio=ratio,
        calibration=calibration, probe_ratio=None, seq_len=SEQ_LEN, num_windows=args.num_windows,
        batch_size=8, tensor_parallel_size=1, dtype=args.dtype,
    )
    # The observer resolves as an out-of-tree method of this script (the engine is in-process).
    extra = {"method": f"__main__:{GroupCountingProbePruning.__name__}",
             "method_options": {"head_groups": head_groups}}
    GroupCountingProbePruning.counts = dict.fromkeys(GroupCountingProbePruning.counts, 0)
    print(f"[head_groups] PP {ratio} {head_groups} ...", file=sys.stderr, flush=True)
    (busy, _), own, started = cpu_seconds(), time.process_time(), time.monotonic()
    result = asdict(evaluate_perplexity(run, extra))
    wall, own = time.monotonic() - started, time.process_time() - own
    counts = dict(GroupCountingProbePruning.counts)
    result |= {
        "method_options": extra["method_options"],
        "observer": "GroupCountingProbePruning (PP's decisions, counted)",
        "attention_decisions": counts,
        "fully_pruned_group_share": counts["fully_pruned_groups"] / max(1, counts["groups"]),
        "kept_head_share": counts["kept_heads"] / max(1, counts["heads"]),
        "wall_seconds": wall,
        "cpu_seconds": own,
        # Other work on the machine slows a run down: the CPU seconds it took meanwhile.
        "others_cpu_seconds": max(0.0, cpu_seconds()[0] - busy - own),
    }
    print(f"[head_groups] PP {ratio} {head_groups}: perplexity {result['perplexity']:.3f}, "
          f"fully pruned groups {result['fully_pruned_group_share']:.1%} ({wall:.0f} s)",
          file=sys.stderr, flush=True)
    return result


def decode_kv_reads(name: str, layers: int, heads: int, kv_heads: int, ratio: float) -> dict:
    """Share of the KV cache a decode step's kept-head attention reads in a pruned layer.

    Every KV head holds as many bytes, so the share is the share of KV heads
    read. Whole groups: kept groups / groups. One head at a time: a group is
    skipped only if its every query head is among the P pruned ones; were the
    pruned heads a uniformly random P-subset, the expected number of such
    groups is ``G * C(H - g, P - g) / C(H, P)``; at best ``floor(P / g)``.
    """
    group = heads // kv_heads
    r = layer_ratio(ratio, layers, SKIPPED_LAYERS)
    kept = num_kept_heads(heads, r)
    pruned = heads - kept
    random_skipped = kv_heads * math.comb(heads - group, pruned - group) / math.comb(heads, pruned) \
        if pruned >= group else 0.0
    kept_groups = num_kept_groups(kept, group)
    return {
        "shape": name, "layers": layers, "heads": heads, "kv_heads": kv_heads, "ratio": ratio,
        "layer_ratio": r, "kept_heads_per_head": kept, "kept_heads_whole_groups": kept_groups * group,
        "read_share_whole_groups": kept_groups / kv_heads,
        "read_share_per_head_random": 1 - random_skipped / kv_heads,
        "read_share_per_head_best": 1 - (pruned // group) / kv_heads,
    }


def tables(report: dict) -> str:
    runs = report["perplexity"]
    rows = ["| ratio | heads chosen | perplexity | kept heads | KV groups fully pruned | wall s |",
            "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        rows.append(f"| {run['ratio']} | {run['method_options']['head_groups']} | {run['perplexity']:.2f} "
                    f"| {run['kept_head_share']:.1%} | {run['fully_pruned_group_share']:.1%} "
                    f"| {run['wall_seconds']:.0f} |")
    rows += ["", "| shape | ratio | kept heads (per head / whole groups) | KV read, whole groups "
             "| KV read, per head (random / best case) |", "|---|---|---|---|---|"]
    for s in report["decode_kv_reads"]:
        rows.append(f"| {s['shape']} ({s['heads']} q / {s['kv_heads']} KV) | {s['ratio']} "
                    f"| {s['kept_heads_per_head']} / {s['kept_heads_whole_groups']} of {s['heads']} "
                    f"| {s['read_share_whole_groups']:.1%} | {s['read_share_per_head_random']:.1%} "
                    f"/ {s['read_share_per_head_best']:.1%} |")
    return "\n".join(rows)


def main() -> int:
    parser = protocol_parser(__doc__, num_samples=32)
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    model, calibration, timing = shared_calibration(args, "head_groups")
    report = {
        "command": command, "model": model, "seq_len": SEQ_LEN, "num_windows": args.num_windows,
        "batch_size": 8, "dtype": args.dtype, "cpu": cpu_features(), "torch_threads": torch.get_num_threads(),
        "calibration": {"file": str(calibration), "num_samples": args.num_samples, "seq_len": SEQ_LEN,
                        "seed": SEED, **timing},
        "perplexity": {},
        "decode_kv_reads": [decode_kv_reads(*shape, ratio) for shape in SHAPES for ratio in sorted(args.ratios)],
    }
    out = RESULTS / f"head_groups_{args.tag}.json"
    for ratio in args.ratios:
        for head_groups in ("query", "kv"):
            report["perplexity"][f"probe:{ratio}:{head_groups}"] = evaluate(
                model, str(calibration), ratio, head_groups, args)
            write_results(out, report)  # after every run: a long run keeps what it measured
    print(tables(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
