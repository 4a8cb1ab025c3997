"""PP's variants against full-batch probing and the static baselines, on two texts of different domains.

Runs `vllm-pp eval ppl`'s protocol (the first 128 contiguous 512-token windows, 8
windows per step, float32) on the evaluation text (Wikipedia articles) and on the
held-out text (C4 web pages, vllm_pp/tools/text_data.py), at each ratio, for: PP
(method_options allocation "uniform", the default), PP with allocation "calibrated"
(per-block budgets by FLAP's global allocation over PPsp calibration scores,
compute-matched to the uniform counts), full-batch probing, FLAP and Wanda-sp, plus the
dense model once per text, and last full-batch probing with the calibrated budgets (the
budgets' cost with no probe to blame). Every method reads one calibration file (`vllm-pp
calibrate`, random 512-token windows of the calibration text, seed 0; 256 windows is the
canonical protocol). The most informative runs go first and the results file is written
after every run, so a partial run keeps what it measured; a run already in the results
file (same tag) is not repeated. Also records each block's kept counts under both
allocations (computed offline from the same file and weights). Writes
benchmarks/results/probe_variants_<tag>.json and prints a Markdown table.

    python benchmarks/probe_variants.py [--num-samples 256] [--ratios 0.4 0.2] [--tag DATE]
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

from vllm_pp.tools.text_data import prepare_text

RESULTS = Path(__file__).resolve().parent / "results"
TEXTS = ("evaluation", "heldout")
# (label, method, method_options); PP's variants first: they are what is compared.
VARIANTS = [
    ("PP", "probe", {}),
    ("PP calibrated", "probe", {"allocation": "calibrated"}),
    ("full-batch", "full-batch", {}),
    ("FLAP", "flap", {}),
    ("Wanda-sp", "wanda-sp", {}),
    # Whether the calibrated budgets themselves cost quality, with no probe to blame.
    ("full-batch calibrated", "full-batch", {"allocation": "calibrated"}),
]


def plan(ratios: list[float]) -> list[tuple[str, str, float, str, dict]]:
    """(text, label, ratio, method, method_options) in the order to run them."""
    runs = []
    for group in (VARIANTS[:2], VARIANTS[2:3]):
        for ratio in ratios:
            runs += [(text, label, ratio, method, options)
                     for label, method, options in group for text in TEXTS]
    runs += [(text, "dense", 0.0, "probe", {}) for text in TEXTS]
    for ratio in ratios:
        runs += [(text, label, ratio, method, options)
                 for label, method, options in VARIANTS[3:5] for text in TEXTS]
    for ratio in ratios:
        runs += [(text, label, ratio, method, options)
                 for label, method, options in VARIANTS[5:] for text in TEXTS]
    return runs


def evaluate(model: str, text: Path, calibration: str, label: str, method: str, ratio: float,
             options: dict, args) -> dict:
    from vllm_pp.tools.evaluate import PerplexityRun, evaluate_perplexity

    run = PerplexityRun(
        model=model, text=str(text), method=method, ratio=ratio,
        calibration=calibration if ratio > 0 else None, probe_ratio=None, seq_len=SEQ_LEN,
        num_windows=args.num_windows, batch_size=8, tensor_parallel_size=1, dtype=args.dtype,
    )
    extra = {"method_options": options} if options else {}
    print(f"[probe_variants] {label} {ratio} on {text.name} ...", file=sys.stderr, flush=True)
    (busy, _), own, started = cpu_seconds(), time.process_time(), time.monotonic()
    result = asdict(evaluate_perplexity(run, extra))
    wall, own = time.monotonic() - started, time.process_time() - own
    result |= {
        "label": label, "method_options": options, "wall_seconds": wall, "cpu_seconds": own,
        # Other work on the machine slows a run down: the CPU seconds it took meanwhile.
        "others_cpu_seconds": max(0.0, cpu_seconds()[0] - busy - own),
    }
    print(f"[probe_variants] {label} {ratio} on {text.name}: perplexity {result['perplexity']:.3f} "
          f"({wall:.0f} s)", file=sys.stderr, flush=True)
    return result


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
    rows = ["| method | ratio | evaluation (Wikipedia) | held-out (C4) | wall s (eval / held-out) |",
            "|---|---|---|---|---|"]
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
            rows.append(f"| {label} | {ratio} | {ppl[0]} | {ppl[1]} | {' / '.join(wall)} |")
    return "\n".join(rows)


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
    write_results(out, report)
    for text, label, ratio, method, options in plan(args.ratios):
        key = f"{text}:{label}:{ratio}"
        if key in report["perplexity"] or (args.only and label not in args.only):
            continue
        report["perplexity"][key] = evaluate(model, texts[text], str(calibration), label, method, ratio,
                                             options, args)
        write_results(out, report)  # after every run: a long run keeps what it measured
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
