"""PP's variants against full-batch probing and the static baselines, on two texts of different domains.

Runs `vllm-pp eval ppl`'s protocol (the first 128 contiguous 512-token windows, 8
windows per step, float32) on the evaluation text (Wikipedia articles) and on the
held-out text (C4 web pages, vllm_pp/tools/text_data.py), at each ratio, for: PP with
the probe of largest residual norms ("PP"), PP with allocation "calibrated" (per-block
budgets by FLAP's global allocation over PPsp calibration scores, compute-matched to the
uniform counts), full-batch probing, FLAP and Wanda-sp, plus the dense model once per
text, then full-batch probing with the calibrated budgets (the budgets' cost with no
probe to blame), and PP with an evenly spaced probe (the default; with the history, alone,
twice as large, with a faster history). Each variant's decision FLOPs as a share of a
dense step's are recorded too. Every method reads one calibration file (`vllm-pp
calibrate`, random 512-token windows of the calibration text, seed 0; 256 windows is the
canonical protocol). The most informative runs go first and the results file is written
after every run, so a partial run keeps what it measured; a run already in the results
file (same tag) is not repeated. Also records each block's kept counts under both
allocations (computed offline from the same file and weights). Writes
benchmarks/results/probe_variants_<tag>.json and prints a Markdown table.

    python benchmarks/probe_variants.py [--num-samples 256] [--ratios 0.4 0.2] [--tag DATE] [--only LABEL ...]
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common import write_results
from first_run import SEED, SEQ_LEN, cpu_features, cpu_seconds, protocol_parser, shared_calibration
from quality import probe_flops_share

from vllm_pp.tools.text_data import prepare_text

RESULTS = Path(__file__).resolve().parent / "results"
TEXTS = ("evaluation", "heldout")
CALIBRATED = {"method_options": {"allocation": "calibrated"}}
STRIDED = {"probe": {"selection": "strided"}}
TOP_NORM = {"probe": {"selection": "tokens"}}
# (label, method, probe_pruning settings beyond method and ratio); PP's variants
# first: they are what is compared.
VARIANTS = [
    # "PP": the probe of the largest residual norms (the default until the strided
    # probe replaced it; its runs in probe_variants_2026-12-03.json ran at that default).
    ("PP", "probe", TOP_NORM),
    ("PP calibrated", "probe", CALIBRATED | TOP_NORM),
    ("full-batch", "full-batch", {}),
    ("FLAP", "flap", {}),
    ("Wanda-sp", "wanda-sp", {}),
    # Whether the calibrated budgets themselves cost quality, with no probe to blame.
    ("full-batch calibrated", "full-batch", CALIBRATED),
    # A probe that samples the step (evenly spaced tokens: the default since it was
    # measured here) instead of its largest norms, fused with the history, and alone.
    ("PP strided", "probe", STRIDED),
    ("PP strided, no history", "probe", STRIDED | {"history": {"fusion": "probe-only"}}),
    # Twice the probe, within the decision budget (decision_flops).
    ("PP strided, probe 5%", "probe", {"probe": {"selection": "strided", "ratio": 0.05}}),
    # A history that follows the served text faster (the paper's momentum is 0.99).
    ("PP strided, momentum 0.9", "probe", STRIDED | {"history": {"ema_momentum": 0.9}}),
]


def plan(ratios: list[float]) -> list[tuple[str, str, float, str, dict]]:
    """(text, label, ratio, method, settings) in the order to run them."""
    runs = []
    for group in (VARIANTS[:2], VARIANTS[2:3]):
        for ratio in ratios:
            runs += [(text, label, ratio, method, settings)
                     for label, method, settings in group for text in TEXTS]
    runs += [(text, "dense", 0.0, "probe", {}) for text in TEXTS]
    for ratio in ratios:
        runs += [(text, label, ratio, method, settings)
                 for label, method, settings in VARIANTS[3:5] for text in TEXTS]
    for ratio in ratios:
        runs += [(text, label, ratio, method, settings)
                 for label, method, settings in VARIANTS[5:] for text in TEXTS]
    return runs


def evaluate(model: str, text: Path, calibration: str, label: str, method: str, ratio: float,
             settings: dict, args) -> dict:
    from vllm_pp.tools.evaluate import PerplexityRun, evaluate_perplexity

    run = PerplexityRun(
        model=model, text=str(text), method=method, ratio=ratio,
        calibration=calibration if ratio > 0 else None, probe_ratio=None, seq_len=SEQ_LEN,
        num_windows=args.num_windows, batch_size=8, tensor_parallel_size=1, dtype=args.dtype,
    )
    print(f"[probe_variants] {label} {ratio} on {text.name} ...", file=sys.stderr, flush=True)
    (busy, _), own, started = cpu_seconds(), time.process_time(), time.monotonic()
    result = asdict(evaluate_perplexity(run, settings))
    wall, own = time.monotonic() - started, time.process_time() - own
    result |= {
        "label": label, "settings": settings, "wall_seconds": wall, "cpu_seconds": own,
        # Other work on the machine slows a run down: the CPU seconds it took meanwhile.
        "others_cpu_seconds": max(0.0, cpu_seconds()[0] - busy - own),
    }
    print(f"[probe_variants] {label} {ratio} on {text.name}: perplexity {result['perplexity']:.3f} "
          f"({wall:.0f} s)", file=sys.stderr, flush=True)
    return result


def decision_flops_share(model: str, method: str, settings: dict) -> float:
    """A decision's FLOPs as a share of a dense step's (quality.probe_flops_share, 512-token
    windows): PP probes ``probe.ratio`` of the step's tokens, full-batch probing every token
    (a dense pass up to the output projections), the static methods nothing."""
    from vllm_pp.config import DEFAULT_SKIP_LAYERS, ProbeConfig

    probed = {"probe": settings.get("probe", {}).get("ratio", ProbeConfig.ratio), "full-batch": 1.0}
    config = json.loads((Path(model) / "config.json").read_text())
    num_pruned = config["num_hidden_layers"] - len(settings.get("skip_layers", DEFAULT_SKIP_LAYERS))
    return probe_flops_share(config, probed.get(method, 0.0), num_pruned, SEQ_LEN)


def kept_counts(model: str, calibration: str, ratio: float) -> dict:
    """Each pruned block's kept units under both allocations (rank 0 of 1), from the files alone,
    and the share of the pruned blocks' head and channel cost (FLAP's accounting) they remove."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vllm_pp.config import ProbePruningConfig
    from vllm_pp.methods.base import PrunableBlock, WorkerInfo
    from vllm_pp.algorithm.selection import flap_unit_costs, removed_cost_share
    from vllm_pp.methods.probe import ProbePruningMethod
    from vllm_pp.storage.statistics import model_identity

    hf = AutoConfig.from_pretrained(model)
    weights = load_file(str(Path(model) / "model.safetensors"))
    counts = {}
    for allocation in ("uniform", "calibrated"):
        config = ProbePruningConfig.from_dict({
            "ratio": ratio, "calibration": calibration, "method_options": {"allocation": allocation}})
        skipped = set(config.skip_layers)
        head_dim = hf.hidden_size // hf.num_attention_heads
        blocks, output = [], {}
        for layer in range(hf.num_hidden_layers):
            if layer in skipped:
                continue
            prefix = f"model.layers.{layer}"
            attention = PrunableBlock(layer, "attention", hf.num_attention_heads * head_dim, head_dim,
                                      hf.num_key_value_heads)
            mlp = PrunableBlock(layer, "mlp", hf.intermediate_size)
            blocks += [attention, mlp]
            output[attention] = weights[f"{prefix}.self_attn.o_proj.weight"]
            output[mlp] = weights[f"{prefix}.mlp.down_proj.weight"]
        worker = WorkerInfo(hf.num_hidden_layers, 0, 1, model_identity(hf), max_model_len=SEQ_LEN)
        method = ProbePruningMethod(config, blocks, worker)
        method.prepare(output)
        counts[allocation] = {f"{b.layer_index}.{b.kind}": method.kept_counts[b] for b in blocks}
        costs = flap_unit_costs(model_identity(hf), hf.hidden_size, head_dim, SEQ_LEN)
        counts[f"{allocation}_removed_cost_share"] = removed_cost_share(
            [method.kept_counts[b] for b in blocks if b.kind == "attention"], hf.num_attention_heads,
            [method.kept_counts[b] for b in blocks if b.kind == "mlp"],
            [b.width for b in blocks if b.kind == "mlp"], *costs)
    return counts


def table(report: dict) -> str:
    runs = report["perplexity"]
    rows = ["| method | ratio | evaluation (Wikipedia) | held-out (C4) | decision FLOPs (share of dense) "
            "| wall s (eval / held-out) |", "|---|---|---|---|---|---|"]
    labels = ["dense"] + [label for label, _, _ in VARIANTS]
    for ratio in [0.0, *report["ratios"]]:
        for label in labels:
            if (label == "dense") != (ratio == 0.0):
                continue
            cells = [runs.get(f"{text}:{label}:{ratio}") for text in TEXTS]
            if not any(cells):
                continue
            ppl = [f"{c['perplexity']:.2f}" if c else "-" for c in cells]
            wall = [f"{c['wall_seconds']:.0f}" if c else "-" for c in cells]
            flops = report["decision_flops_share"].get(label)
            share = "-" if flops is None else f"{flops:.2%}"
            rows.append(f"| {label} | {ratio} | {ppl[0]} | {ppl[1]} | {share} | {' / '.join(wall)} |")
    return "\n".join(rows)


# The plot's methods: (label, tick).
PLOTTED = [("PP strided", "PP (default,\nspaced probe)"), ("PP", "PP, probe of\nlargest norms"),
           ("full-batch", "full-batch\nprobing"), ("FLAP", "FLAP"), ("Wanda-sp", "Wanda-sp")]


def plot(report: dict, out: Path) -> None:
    """Perplexity per method at each ratio, one panel per text, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["perplexity"]
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(12, 4.2))
    for ax, text in zip(axes, TEXTS):
        for i, ratio in enumerate(sorted(report["ratios"])):
            offset = (i - (len(report["ratios"]) - 1) / 2) * 0.4
            values = [runs.get(f"{text}:{label}:{ratio}", {}).get("perplexity", float("nan"))
                      for label, _ in PLOTTED]
            bars = ax.bar([j + offset for j in range(len(PLOTTED))], values, width=0.4, label=f"ratio {ratio}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        if f"{text}:dense:0.0" in runs:
            ax.axhline(runs[f"{text}:dense:0.0"]["perplexity"], color="black", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xticks(range(len(PLOTTED)), [tick for _, tick in PLOTTED], fontsize=7)
        ax.set_title(f"{Path(report['texts'][text]).name} ({text})", fontsize=9)
        ax.set_ylabel("perplexity (log scale, lower is better)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(report['model']).name}, {report['num_windows']} x {report['seq_len']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    parser = protocol_parser(__doc__, num_samples=256)
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    model, calibration, timing = shared_calibration(args, "probe_variants")
    paths = prepare_text(quiet=True)
    texts = {"evaluation": paths.evaluation, "heldout": paths.heldout}
    out = RESULTS / f"probe_variants_{args.tag}.json"
    report = json.loads(out.read_text()) if out.exists() else {}
    report |= {
        "command": command, "model": model, "seq_len": SEQ_LEN, "num_windows": args.num_windows,
        "batch_size": 8, "dtype": args.dtype, "cpu": cpu_features(), "torch_threads": torch.get_num_threads(),
        "texts": {name: str(path) for name, path in texts.items()},
        "calibration": {"file": str(calibration), "num_samples": args.num_samples, "seq_len": SEQ_LEN,
                        "seed": SEED, **timing},
        "ratios": args.ratios,
    }
    report.setdefault("perplexity", {})
    report["kept_counts"] = {str(r): kept_counts(model, str(calibration), r) for r in args.ratios}
    report["decision_flops_share"] = {label: decision_flops_share(model, method, settings)
                                      for label, method, settings in VARIANTS}
    write_results(out, report)
    for text, label, ratio, method, settings in plan(args.ratios):
        key = f"{text}:{label}:{ratio}"
        if key in report["perplexity"] or (args.only and label not in args.only):
            continue
        report["perplexity"][key] = evaluate(model, texts[text], str(calibration), label, method, ratio,
                                             settings, args)
        write_results(out, report)  # after every run: a long run keeps what it measured
    plot(report, out.with_suffix(".png"))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
