"""Offline throughput of vanilla vLLM, the plugin and the pruning methods, side by side.

Reuses `vllm bench throughput` (vllm/benchmarks/throughput.py): its argument
parser builds every engine (so the plugin's --pp-* flags apply as on the
command line), its random dataset samples the requests, and its request
runner times them. What it adds is the A/B design: vanilla vLLM stays up for
the whole invocation, the engines it is compared with are started next to it
(``--max-engines`` at a time), and every round times each workload on each
live engine in turn, in a rotating order; ratios are taken against the
vanilla runs of the same group of rounds, so slow drifts of this shared
machine cancel out.

    python benchmarks/throughput.py --model smollm2            # ~20 min
    python benchmarks/throughput.py --model 7b-width           # ~20 min
    python benchmarks/throughput.py --model smollm2 --quick    # ~5 min
    python benchmarks/throughput.py --model smollm2 --breakdown  # per-step cost shares
    python benchmarks/throughput.py --plot benchmarks/results/throughput_smollm2.json

Engines: float32 (bf16 matmuls are emulated on AVX2 CPUs), eager (pruning
forces it; vanilla is run eager too), prefix caching off, vLLM's CPU defaults
otherwise (on a 2-core machine the worker computes on one core).

``7b-width`` is `vllm-pp model random --family llama-7b-width` (LLaMA-2-7B
layer widths, 4 layers) with no layer exempt from pruning: at ratio 0.4 its 4
layers prune 40% of their heads and channels, the share of layer compute
LLaMA-2-7B prunes at 0.4 with 29 of 32 layers at r' = 0.44.

Writes benchmarks/results/throughput_<model>[_quick].json and a PNG next to it;
``--breakdown`` writes breakdown_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    num_prompts: int
    range_ratio: float = 0.0  # vLLM's --random-range-ratio: lengths vary by +-this share

    def argv(self) -> list[str]:
        return [
            "--dataset-name", "random", "--random-input-len", str(self.input_len),
            "--random-output-len", str(self.output_len), "--num-prompts", str(self.num_prompts),
            "--random-range-ratio", str(self.range_ratio),
        ]


@dataclass(frozen=True)
class Engine:
    """One engine setting: ``plugin`` False is vanilla vLLM (VLLM_PLUGINS=)."""

    name: str
    plugin: bool = True
    flags: tuple[str, ...] = ()
    probe_pruning: dict = field(default_factory=dict)  # extra additional_config settings


@dataclass(frozen=True)
class ModelSetup:
    workloads: tuple[Workload, ...]
    engines: tuple[str, ...]  # names in ENGINES, vanilla first
    max_engines: int  # engines alive at once (memory)
    rounds: int
    skip_layers: str | None = None  # --pp-skip-layers for this model
    kv_cache_gib: int = 1


def engines(calibration: str, skip_layers: str | None, reuse: int) -> dict[str, Engine]:
    """Every engine setting the benchmark knows, by name."""
    common = ("--pp-calibration", calibration)
    if skip_layers is not None:
        common += (f"--pp-skip-layers={skip_layers}",)
    pp = {"reuse_decode_steps": reuse}
    return {
        "vanilla": Engine("vanilla", plugin=False),
        "ratio-0": Engine("ratio-0"),
        "pp-0.2": Engine("pp-0.2", flags=("--pp-ratio", "0.2", *common), probe_pruning=pp),
        "pp-0.4": Engine("pp-0.4", flags=("--pp-ratio", "0.4", *common), probe_pruning=pp),
        "pp-0.4-every-step": Engine(
            "pp-0.4-every-step", flags=("--pp-ratio", "0.4", *common),
            probe_pruning={"reuse_decode_steps": 0},
        ),
        # The attention kernel on every head at every step, and on the kept heads
        # at every step, against the default (kept heads at steps that prefill).
        "pp-0.4-all-heads": Engine(
            "pp-0.4-all-heads", flags=("--pp-ratio", "0.4", *common),
            probe_pruning={**pp, "attention_heads": "all"},
        ),
        "pp-0.4-kept-heads": Engine(
            "pp-0.4-kept-heads", flags=("--pp-ratio", "0.4", *common),
            probe_pruning={**pp, "attention_heads": "kept"},
        ),
        # The probe as it was by default before the evenly spaced one: the largest
        # residual norms, and the attention probe no larger than the MLP's.
        "pp-0.4-top-norm": Engine(
            "pp-0.4-top-norm", flags=("--pp-ratio", "0.4", *common),
            probe_pruning={**pp, "probe": {"selection": "tokens", "every_decode_token": False}},
        ),
        # A probe twice the default's share of the step's tokens.
        "pp-0.4-probe-5": Engine(
            "pp-0.4-probe-5", flags=("--pp-ratio", "0.4", "--pp-probe-ratio", "0.05", *common),
            probe_pruning=pp,
        ),
        "flap-0.4": Engine("flap-0.4", flags=("--pp-ratio", "0.4", "--pp-method", "flap", *common)),
        "wanda-sp-0.4": Engine(
            "wanda-sp-0.4", flags=("--pp-ratio", "0.4", "--pp-method", "wanda-sp", *common)
        ),
    }


ALL_ENGINES = ("vanilla", "ratio-0", "pp-0.2", "pp-0.4", "pp-0.4-every-step", "flap-0.4", "wanda-sp-0.4")
# Not run by default; for side-by-side runs with --engines.
EXTRA_ENGINES = ("pp-0.4-all-heads", "pp-0.4-kept-heads", "pp-0.4-top-norm", "pp-0.4-probe-5")

SETUPS = {
    "smollm2": ModelSetup(
        workloads=(
            Workload("prefill-heavy", 1024, 16, 2),
            Workload("decode-heavy", 128, 256, 8),
            Workload("mixed", 512, 128, 4, range_ratio=0.5),
        ),
        engines=ALL_ENGINES, max_engines=4, rounds=1,  # ~3.3 GB per engine
    ),
    # A decode step reads ~4 GB of float32 weights here (about 1 s): 128 output
    # tokens instead of 256 keep the run near 20 minutes.
    "7b-width": ModelSetup(
        workloads=(
            Workload("prefill-heavy", 1024, 16, 2),
            Workload("decode-heavy", 128, 128, 4),
        ),
        engines=("vanilla", "ratio-0", "pp-0.4"),
        max_engines=2, rounds=1, skip_layers="",
    ),
}
QUICK = {
    "smollm2": ModelSetup(
        workloads=(Workload("prefill-heavy", 1024, 16, 2), Workload("decode-heavy", 128, 64, 8)),
        engines=("vanilla", "pp-0.4"), max_engines=2, rounds=1,
    ),
    "7b-width": ModelSetup(
        workloads=(Workload("prefill-heavy", 512, 4, 1), Workload("decode-heavy", 64, 32, 4)),
        engines=("vanilla", "pp-0.4"), max_engines=2, rounds=1, skip_layers="",
    ),
}

def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ models


def prepare_model(name: str) -> tuple[Path, Path]:
    """The model directory and its calibration file, built on first use (cached)."""
    from vllm_pp.tools.calibrate import prepare_calibration

    if name == "smollm2":
        from vllm_pp.tools.default_model import prepare_default_model

        model, samples, seq_len = prepare_default_model(quiet=True), 256, 512
    else:
        from vllm_pp.tools.random_models import build_random_model

        # Random weights: a few windows give its (random) activation statistics.
        model, samples, seq_len = build_random_model("llama-7b-width", quiet=True), 8, 256
    calibration = prepare_calibration(
        model, num_samples=samples, seq_len=seq_len, batch_size=4, dtype="float32"
    )
    return model, calibration


# --------------------------------------------------------- vLLM's machinery


def bench_args(model: Path, workload: Workload, engine: Engine):
    """`vllm bench throughput` arguments for one engine and workload, parsed by vLLM's parser."""
    from vllm.benchmarks.throughput import add_cli_args, validate_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--model", str(model), "--dtype", "float32", "--enforce-eager",
        "--no-enable-prefix-caching", "--max-model-len", "2048",
        "--max-num-batched-tokens", "2048", "--max-num-seqs", "16",
        "--disable-detokenize", "--seed", "0", *workload.argv(), *engine.flags,
    ]
    if engine.probe_pruning:
        argv += ["--additional-config", json.dumps({"probe_pruning": engine.probe_pruning})]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def sample_requests(args):
    """vLLM's random-dataset requests for ``args`` (the same for every engine: same seed)."""
    import random

    from vllm.benchmarks.throughput import get_requests
    from vllm.tokenizers import get_tokenizer

    random.seed(args.seed)
    return get_requests(args, get_tokenizer(args.tokenizer))


def start_engine(args, engine: Engine, kv_cache_gib: int, in_process: bool = False):
    """``engine`` on ``args``; in-process, torch gets one core, as a multiprocess worker does."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_pp.tools import engine as factory

    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if in_process:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    return factory.start_engine(
        engine_args=EngineArgs.from_cli_args(args), plugin=engine.plugin, in_process=in_process, env=env
    )


def time_requests(llm, requests) -> float:
    """Seconds vLLM's throughput runner takes for ``requests``."""
    from vllm.benchmarks.throughput import _run_vllm_requests

    elapsed, _ = _run_vllm_requests(
        llm, requests, n=1, disable_detokenize=True, do_profile=False,
        prequeue_requests=False, enable_lora=False,
    )
    return elapsed


# ------------------------------------------------------------------ A/B runs


def run_ab(model: Path, calibration: Path, setup: ModelSetup, reuse: int) -> dict:
    """Seconds per (workload, engine) round, grouped with the vanilla runs of the same rounds."""
    from vllm_pp.tools.engine import stop_engine

    known = engines(str(calibration), setup.skip_layers, reuse)
    others = [known[n] for n in setup.engines if n != "vanilla"]
    size = setup.max_engines - 1
    groups = [others[i:i + size] for i in range(0, len(others), size)]
    workloads = {
        w.name: (w, sample_requests(bench_args(model, w, known["vanilla"])))
        for w in setup.workloads
    }
    # One short request per workload: first-call costs (allocations, oneDNN
    # kernels per shape) stay out of the timed runs.
    warmups = {
        w.name: sample_requests(
            bench_args(model, Workload(w.name, w.input_len, min(w.output_len, 8), 1), known["vanilla"])
        )
        for w in setup.workloads
    }
    runs: dict = {w: {} for w in workloads}  # workload -> engine -> group -> [seconds]
    vanilla_args = bench_args(model, setup.workloads[0], known["vanilla"])
    live = {"vanilla": start_engine(vanilla_args, known["vanilla"], setup.kv_cache_gib)}
    try:
        for group_index, group in enumerate(groups):
            for engine in group:
                log(f"starting {engine.name}")
                args = bench_args(model, setup.workloads[0], engine)
                live[engine.name] = start_engine(args, engine, setup.kv_cache_gib)
            names = ["vanilla"] + [e.name for e in group]
            for name in names:
                for workload in workloads:
                    time_requests(live[name], warmups[workload])
            for round_index in range(setup.rounds):
                for workload, (_, requests) in workloads.items():
                    shift = (round_index + group_index) % len(names)
                    for name in names[shift:] + names[:shift]:
                        seconds = time_requests(live[name], requests)
                        runs[workload].setdefault(name, {}).setdefault(group_index, []).append(seconds)
                        log(f"group {group_index} round {round_index} {workload} {name}: {seconds:.2f} s")
            for engine in group:
                stop_engine(live.pop(engine.name))
    finally:
        for llm in live.values():
            stop_engine(llm)
    return summarise(runs, workloads, groups)


def summarise(runs: dict, workloads: dict, groups: list) -> dict:
    """Throughput per engine and its ratio to the vanilla runs interleaved with it."""
    group_of = {e.name: g for g, group in enumerate(groups) for e in group}
    result = {}
    for name, (workload, requests) in workloads.items():
        tokens = sum(r.prompt_len + r.expected_output_len for r in requests)
        output_tokens = sum(r.expected_output_len for r in requests)
        entry = {"workload": workload.__dict__, "total_tokens": tokens, "engines": {}}
        for engine, by_group in runs[name].items():
            seconds = [s for g in by_group.values() for s in g]
            entry["engines"][engine] = {
                "seconds": seconds,
                "tokens_per_s": tokens / statistics.median(seconds),
                "output_tokens_per_s": output_tokens / statistics.median(seconds),
            }
            if engine != "vanilla":
                vanilla = runs[name]["vanilla"][group_of[engine]]
                mine = by_group[group_of[engine]]
                entry["engines"][engine]["vs_vanilla"] = statistics.median(vanilla) / statistics.median(mine)
                entry["engines"][engine]["vanilla_seconds_same_rounds"] = vanilla
        result[name] = entry
    return result


# ---------------------------------------------------------------- breakdown


def run_breakdown(model: Path, calibration: Path, setup: ModelSetup, reuse: int, names) -> dict:
    """Shares of wall time per pruned-path section, in an in-process engine.

    The engine core and worker run in this process (so the section totals are
    readable here) on one core, as the worker of a multiprocess engine does.
    """
    from vllm_pp.observability import profiling
    from vllm_pp.tools.engine import stop_engine

    known = engines(str(calibration), setup.skip_layers, reuse)
    result = {}
    for name in names:
        engine = known[name]
        result[name] = {}
        args = bench_args(model, setup.workloads[0], engine)
        llm = start_engine(args, engine, setup.kv_cache_gib, in_process=True)
        try:
            for workload in setup.workloads:
                requests = sample_requests(bench_args(model, workload, engine))
                time_requests(llm, requests[:1])  # warm-up
                profiling.snapshot()
                wall = time_requests(llm, requests)
                sections = profiling.snapshot()
                shares = {s: v["seconds"] / wall for s, v in sections.items()}
                shares["other"] = 1.0 - sum(shares.values())
                decision = shares["probe"] + shares["scoring"] + shares["selection"]
                result[name][workload.name] = {
                    "wall_s": wall, "shares": shares, "sections": sections,
                    "probe_scoring_selection": decision,
                }
                log(f"breakdown {name} {workload.name}: " + ", ".join(
                    f"{s} {100 * v:.1f}%" for s, v in shares.items()))
        finally:
            stop_engine(llm)
    return result


# -------------------------------------------------------------------- plots


def plot(results: dict, out: Path) -> None:
    """Throughput relative to vanilla vLLM, per workload and engine, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["throughput"])
    names = [n for n in results["engines"] if n != "vanilla"]
    fig, ax = plt.subplots(figsize=(3.6 + 1.6 * len(workloads) * max(1, len(names)) / 3, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [results["throughput"][w]["engines"].get(name, {}).get("vs_vanilla", float("nan"))
                  for w in workloads]
        label = name
        if name.startswith("pp-") and name != "pp-0.4-every-step" and results.get("reuse_decode_steps"):
            label += f" (reuse_decode_steps {results['reuse_decode_steps']})"
        bars = ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(workloads))], values,
                      width=width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, label="vanilla vLLM")
    ax.axhline(1.30, color="tab:red", linestyle=":", linewidth=0.8, label="target PP 0.4 prefill")
    ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
    ax.set_ylabel("throughput / vanilla vLLM (higher is faster)")
    ax.set_title(f"{results['model_name']}, float32, CPU ({results['mode']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def markdown_table(results: dict) -> str:
    workloads = list(results["throughput"])
    rows = ["| engine | " + " | ".join(workloads) + " |", "|---" * (len(workloads) + 1) + "|"]
    for name in results["engines"]:
        cells = []
        for w in workloads:
            entry = results["throughput"][w]["engines"].get(name)
            if entry is None:
                cells.append("—")
            elif name == "vanilla":
                cells.append(f"1.00 ({entry['tokens_per_s']:.0f} tok/s)")
            else:
                cells.append(f"{entry['vs_vanilla']:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SETUPS))
    parser.add_argument("--quick", action="store_true", help="a short smoke run (fewer engines and tokens)")
    parser.add_argument("--engines", nargs="*", choices=ALL_ENGINES + EXTRA_ENGINES,
                        help="override the engine list")
    parser.add_argument("--workloads", nargs="*", help="run only these workloads")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--max-engines", type=int,
                        help="engines alive at once, vanilla included (default: the model's; ~3.3 GB each for smollm2, ~7.8 GB for 7b-width: 3 of those do not fit in 24 GB)")
    parser.add_argument("--reuse-decode-steps", type=int, default=None,
                        help="probe_pruning.reuse_decode_steps of the pp engines (default: the config's)")
    parser.add_argument("--breakdown", action="store_true", help="per-step cost shares instead of A/B runs")
    parser.add_argument("--tag", help="appended to the results' file names, to keep several runs side by side")
    parser.add_argument("--plot", type=Path, help="only draw the plot and table of this results file")
    args = parser.parse_args(argv)
    if args.plot:
        results = json.loads(args.plot.read_text())
        plot(results, args.plot.with_suffix(".png"))
        print(markdown_table(results))
        return 0
    if args.model is None:
        parser.error("--model is required")
    if args.breakdown:
        # Read when vllm_pp.observability.profiling is imported: set before anything imports it.
        os.environ["VLLM_PP_PROFILE"] = "1"
    from vllm.plugins import load_general_plugins

    from vllm_pp.config import ProbePruningConfig

    load_general_plugins()  # the --pp-* flags in vLLM's parser
    setup = (QUICK if args.quick else SETUPS)[args.model]
    if args.workloads:
        setup = _replace(setup, workloads=tuple(w for w in setup.workloads if w.name in args.workloads))
    if args.engines:
        setup = _replace(setup, engines=tuple(dict.fromkeys(["vanilla", *args.engines])))
    if args.rounds:
        setup = _replace(setup, rounds=args.rounds)
    if args.max_engines:
        setup = _replace(setup, max_engines=args.max_engines)
    reuse = args.reuse_decode_steps
    if reuse is None:
        reuse = ProbePruningConfig().reuse_decode_steps
    model, calibration = prepare_model(args.model)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    started = time.monotonic()
    header = {
        "model": str(model), "model_name": args.model, "calibration": str(calibration),
        "mode": "quick" if args.quick else "full", "reuse_decode_steps": reuse,
        "skip_layers": setup.skip_layers, "rounds": setup.rounds,
        "engines": list(setup.engines), "dtype": "float32",
    }
    if args.breakdown:
        names = [n for n in setup.engines if n not in ("vanilla", "ratio-0")]
        results = {**header, "breakdown": run_breakdown(model, calibration, setup, reuse, names)}
        out = RESULTS / f"breakdown_{args.model}{suffix}.json"
    else:
        results = {**header, "throughput": run_ab(model, calibration, setup, reuse)}
        out = RESULTS / f"throughput_{args.model}{suffix}.json"
    results["seconds"] = time.monotonic() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.breakdown:
        plot(results, out.with_suffix(".png"))
        print(markdown_table(results))
    print(out)
    return 0


def _replace(setup: ModelSetup, **changes) -> ModelSetup:
    import dataclasses

    return dataclasses.replace(setup, **changes)


if __name__ == "__main__":
    sys.exit(main())
