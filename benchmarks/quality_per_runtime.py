"""Quality per runtime: perplexity increase per unit of runtime reduction, PP vs FLAP vs Wanda-sp.

The paper's measure (arXiv 2502.15618, abstract: FLAP's is 2.56x PP's on
LLaMA-2-7B at 40%): ``(ppl - ppl_dense) / (1 - 1 / speedup)``, lower is better.
Perplexities come from the evaluator's results (``benchmarks/quality.py``,
128 windows of the evaluation text), speed-ups from one throughput run
(``benchmarks/throughput.py``, each engine against the vanilla runs of its own
rounds), so every method's runtime is measured side by side.

    python benchmarks/quality_per_runtime.py \\
        --throughput benchmarks/results/throughput_smollm2_quick_2026-11-29.json

Writes ``quality_per_runtime_<throughput file's stem>.json`` next to it and prints a table.
A method that is not faster than vanilla has no ratio (no runtime reduction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# throughput engine -> evaluator entry
METHODS = {"pp-0.4": "probe:0.4", "flap-0.4": "flap:0.4", "wanda-sp-0.4": "wanda-sp:0.4"}
# PP's ratio must be this many times lower than the baseline's (issue targets).
TARGETS = {"flap-0.4": 1.5, "wanda-sp-0.4": 1.2}


def ratios(quality: dict, throughput: dict, workload: str) -> dict:
    """Per method: perplexity, its increase over dense, speed-up, runtime reduction and their ratio."""
    dense = quality["dense"]["perplexity"]
    engines = throughput["throughput"][workload]["engines"]
    out = {}
    for engine, entry in METHODS.items():
        if engine not in engines:
            continue
        perplexity = quality[entry]["perplexity"]
        speedup = engines[engine]["vs_vanilla"]
        reduction = 1.0 - 1.0 / speedup
        out[engine] = {
            "perplexity": perplexity,
            "increase": perplexity - dense,
            "speedup": speedup,
            "runtime_reduction": reduction,
            "increase_per_reduction": (perplexity - dense) / reduction if reduction > 0 else None,
        }
    return out


def comparisons(methods: dict) -> dict:
    """How many times lower PP's ratio is than each baseline's, against the target."""
    pp = methods.get("pp-0.4", {}).get("increase_per_reduction")
    out = {}
    for baseline, target in TARGETS.items():
        theirs = methods.get(baseline, {}).get("increase_per_reduction")
        better = theirs / pp if pp and theirs else None
        out[baseline] = {"pp_better_by": better, "target": target,
                         "met": better is not None and better >= target}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput", type=Path, required=True, help="a throughput_*.json with pp-0.4, flap-0.4, wanda-sp-0.4")
    parser.add_argument("--quality", type=Path, default=RESULTS / "quality_SmolLM2-135M-Instruct.json")
    # The evaluator's perplexity is a prefill measurement (prompt logprobs), so
    # it pairs with the prefill-heavy workload's runtime.
    parser.add_argument("--workload", default="prefill-heavy")
    args = parser.parse_args(argv)
    quality = json.loads(args.quality.read_text())
    throughput = json.loads(args.throughput.read_text())
    methods = ratios(quality, throughput, args.workload)
    results = {"quality": str(args.quality), "throughput": str(args.throughput), "workload": args.workload,
               "methods": methods, "pp_against": comparisons(methods)}
    for engine, m in methods.items():
        ratio = m["increase_per_reduction"]
        print(f"{engine:14s} ppl {m['perplexity']:7.2f} (+{m['increase']:.2f})  speed-up {m['speedup']:.2f}x"
              f"  ratio {'none (not faster)' if ratio is None else f'{ratio:.1f}'}")
    for baseline, c in results["pp_against"].items():
        better = "n/a" if c["pp_better_by"] is None else f"{c['pp_better_by']:.2f}x"
        print(f"PP better than {baseline} by {better} (target {c['target']}x): {'met' if c['met'] else 'missed'}")
    out = args.throughput.with_name(f"quality_per_runtime_{args.throughput.stem}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
