"""Online serving latency: `vllm bench serve` against `vllm serve` with and without pruning.

Every server stays up for the whole invocation (vanilla vLLM with the plugin
disabled, and the pruned ones next to it), and each request rate is measured
on every server in turn, in a rotating order, so slow drifts of a shared
machine fall on all of them alike. The client is vLLM's own `vllm bench serve`
(random dataset, Poisson arrivals at a fixed rate, fixed seed, so every server
gets the same requests at the same times); its JSON results give TTFT, TPOT,
ITL and end-to-end latency percentiles.

    python benchmarks/serving.py                     # SmolLM2, ~25 min
    python benchmarks/serving.py --quick             # one rate, fewer requests
    python benchmarks/serving.py --plot benchmarks/results/serving_smollm2.json

Servers: float32, prefix caching off, max_model_len 2048, KV cache 1 GiB,
vLLM's CPU defaults otherwise. Writes benchmarks/results/serving_smollm2[_quick].json
and a PNG next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

RESULTS = Path(__file__).resolve().parent / "results"
VLLM = str(Path(sys.executable).parent / "vllm")
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = ("50", "99")


def log(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


def servers(calibration: Path) -> dict[str, tuple[list[str], dict]]:
    """Server name -> (extra `vllm serve` flags, extra environment)."""
    pruned = ["--pp-calibration", str(calibration)]
    return {
        "vanilla": ([], {"VLLM_PLUGINS": ""}),
        "pp-0.4": (["--pp-ratio", "0.4", *pruned], {}),
        "flap-0.4": (["--pp-ratio", "0.4", "--pp-method", "flap", *pruned], {}),
    }


@contextlib.contextmanager
def vllm_server(model: Path, flags: list[str], env: dict, log_path: Path) -> Iterator[str]:
    """`vllm serve MODEL FLAGS` with the benchmark's engine settings; yields its base URL."""
    from vllm_pp.tools import engine

    argv = [str(model), "--dtype", "float32", "--max-model-len", "2048", "--no-enable-prefix-caching",
            "--enforce-eager", *flags]
    with engine.vllm_server(argv, env={"VLLM_CPU_KVCACHE_SPACE": "1", **env}, log_path=log_path,
                            timeout=600) as url:
        yield url


def bench_serve(url: str, model: Path, rate: float, args, out_dir: Path, name: str) -> dict:
    """One `vllm bench serve` run; returns its result JSON."""
    filename = f"{name}-rate{rate}.json"
    argv = [
        VLLM, "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", str(model),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--request-rate", str(rate), "--seed", "0", "--ignore-eos", "--disable-tqdm",
        "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(PERCENTILES),
        "--save-result", "--result-dir", str(out_dir), "--result-filename", filename,
    ]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads((out_dir / filename).read_text())


def summary(result: dict) -> dict:
    """The latency percentiles (ms) and throughput of one run."""
    row = {
        f"{stat}_{metric}_ms": result[f"{stat}_{metric}_ms"]
        for metric in METRICS
        for stat in ("median", *(f"p{p}" for p in PERCENTILES if p != "50"))
    }
    row["completed"] = result["completed"]
    row["output_throughput"] = result["output_throughput"]
    row["duration_s"] = result["duration"]
    return row


def run(model: Path, calibration: Path, args) -> dict:
    known = servers(calibration)
    names = args.servers or list(known)
    results: dict = {name: {} for name in names}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        out_dir = Path(tmp)
        urls = {}
        for name in names:
            log(f"starting {name}")
            flags, env = known[name]
            urls[name] = stack.enter_context(vllm_server(model, flags, env, RESULTS / f".serving-{name}.log"))
        for name in names:  # first requests pay one-off costs (allocations, kernel set-up)
            bench_serve(urls[name], model, 8.0, argparse.Namespace(**{**vars(args), "num_prompts": 2}), out_dir, f"warmup-{name}")
        for index, rate in enumerate(args.rates):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                row = summary(bench_serve(urls[name], model, rate, args, out_dir, name))
                results[name][str(rate)] = row
                log(f"rate {rate} {name}: TTFT p50 {row['median_ttft_ms']:.0f} ms, "
                    f"TPOT p50 {row['median_tpot_ms']:.0f} ms, E2E p50 {row['median_e2el_ms']:.0f} ms")
    return results


def plot(results: dict, out: Path) -> None:
    """p50 and p99 of each latency metric per server, one panel per request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["servers"])
    rates = list(results["servers"][names[0]])
    fig, axes = plt.subplots(len(rates), len(METRICS), figsize=(3.2 * len(METRICS), 2.8 * len(rates)), squeeze=False)
    for r, rate in enumerate(rates):
        for m, metric in enumerate(METRICS):
            ax = axes[r][m]
            for i, name in enumerate(names):
                row = results["servers"][name][rate]
                ax.bar([i - 0.2, i + 0.2], [row[f"median_{metric}_ms"], row[f"p99_{metric}_ms"]], width=0.4,
                       color=[f"C{i}", f"C{i}"], alpha=1.0)
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_title(f"{metric.upper()} at {rate} req/s (p50 | p99)", fontsize=8)
            ax.set_ylabel("ms", fontsize=7)
    fig.suptitle(f"{results['model_name']}: vllm bench serve, {results['input_len']} in / {results['output_len']} out")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown_table(results: dict) -> str:
    rows = ["| server | req/s | TTFT p50 / p99 | TPOT p50 / p99 | ITL p50 / p99 | E2E p50 / p99 | output tok/s |",
            "|---|---|---|---|---|---|---|"]
    for name, by_rate in results["servers"].items():
        for rate, row in by_rate.items():
            cells = [f"{row[f'median_{m}_ms']:.0f} / {row[f'p99_{m}_ms']:.0f}" for m in METRICS]
            rows.append(f"| {name} | {rate} | " + " | ".join(cells) + f" | {row['output_throughput']:.1f} |")
    return "\n".join(rows) + "\n\n(latencies in ms)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one request rate, 8 requests per run")
    parser.add_argument("--servers", nargs="*", choices=["vanilla", "pp-0.4", "flap-0.4"])
    parser.add_argument("--rates", nargs="*", type=float, default=[0.25, 1.0], help="requests per second")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--plot", type=Path, help="only draw the plot and table of this results file")
    args = parser.parse_args(argv)
    if args.plot:
        results = json.loads(args.plot.read_text())
        plot(results, args.plot.with_suffix(".png"))
        print(markdown_table(results))
        return 0
    if args.quick:
        args.rates, args.num_prompts = args.rates[:1], 8

    from throughput import prepare_model  # benchmarks/ is on sys.path when run as a script

    model, calibration = prepare_model("smollm2")
    started = time.monotonic()
    results = {
        "model": str(model), "model_name": "smollm2", "calibration": str(calibration),
        "mode": "quick" if args.quick else "full", "rates": args.rates, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "dtype": "float32",
        "servers": run(model, calibration, args),
    }
    results["seconds"] = time.monotonic() - started
    out = RESULTS / f"serving_smollm2{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(markdown_table(results))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
