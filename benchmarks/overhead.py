"""Per-step overhead of the plugin against vanilla vLLM, side by side in one run.

Engines (same model, float32, eager, prefix caching off), started one after
the other in this invocation and timed on the same workloads:

* ``vanilla``: vLLM without the plugin (VLLM_PLUGINS=);
* ``ratio-0``: the plugin installed, pruning off (must cost nothing);
* ``dense-path``: ratio 0.4 with the ``dense`` method: the batch view and the
  pruned-execution path run, every unit kept;
* ``trivial-0.4``: ratio 0.4 with a selector that keeps the first 56% of units,
  no scoring (benchmarks/trivial_selection.py);
* ``probe-0.4``: PP at ratio 0.4 (probe, fusion, scoring, selection, EMA).

Workloads: prefill (8 x 256-token prompts, 1 output token) and decode
(8 prompts of 32 tokens, 64 output tokens). Writes
benchmarks/results/overhead_<model>.json; ratios are against ``vanilla``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = {
    "vanilla": (False, None),
    "ratio-0": (True, {"ratio": 0.0}),
    "dense-path": (True, {"ratio": 0.4, "method": "dense"}),
    "trivial-0.4": (True, {"ratio": 0.4, "method": "trivial_selection:FirstUnits"}),
    "probe-0.4": (True, {"ratio": 0.4, "method": "probe"}),
}


def _workloads(vocab: int):
    import random

    rng = random.Random(0)
    prefill = [[rng.randrange(100, vocab) for _ in range(256)] for _ in range(8)]
    decode = [[rng.randrange(100, vocab) for _ in range(32)] for _ in range(8)]
    return prefill, decode


def _time(llm, prompts, max_tokens: int, repeats: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(batch, params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS))
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from helpers.engines import vllm_engine

    config = json.loads((Path(args.model) / "config.json").read_text())
    prefill, decode = _workloads(config["vocab_size"])
    results = {}
    for name, (plugin, probe_pruning) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        extra = {} if probe_pruning is None else {"additional_config": {"probe_pruning": probe_pruning}}
        with vllm_engine(Path(args.model), plugin=plugin, dtype="float32", enforce_eager=True,
                         enable_prefix_caching=False, seed=0, max_model_len=512, max_num_seqs=8,
                         max_num_batched_tokens=2048, **extra) as llm:
            results[name] = {
                "prefill_s": _time(llm, prefill, 1, args.repeats),
                "decode_s": _time(llm, decode, 64, args.repeats),
            }
        print(f"[overhead] {name}: {results[name]}", file=sys.stderr, flush=True)
    base = results.get("vanilla")
    if base:
        for r in results.values():
            r["prefill_vs_vanilla"] = r["prefill_s"] / base["prefill_s"]
            r["decode_vs_vanilla"] = r["decode_s"] / base["decode_s"]
    out = HERE / "results" / f"overhead_{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "dtype": "float32", "results": results}, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
