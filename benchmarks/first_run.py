"""What a smaller calibration costs for the first `make serve`: seconds, perplexity, answers.

For each calibration size (random 512-token windows of the calibration text, seed 0)
this runs `vllm-pp calibrate` and times it, then `vllm-pp eval ppl` (the project's
protocol: the first 128 contiguous 512-token windows, float32) for PP at ratios 0.2
and 0.4, plus PP 0.4 without calibration and dense once. Then it
starts one engine at a time (dense, PP 0.4 uncalibrated, PP 0.2 / 0.4 and FLAP 0.4
with the chosen calibration) and records greedy chat answers to a few prompts, one
request at a time. Calibration files and perplexity results are cached in --workdir;
a reused calibration file has no measured time (null). Each timed command also records
the CPU seconds it used and those other processes used meanwhile (from /proc/stat), since
other work on the machine slows it down. Writes
benchmarks/results/first_run_calibration.json and first_run_answers.json and prints
a Markdown table of each.

    python benchmarks/first_run.py [--num-samples 16 32 64 256] \
        [--num-windows 128] [--answers-calibration-samples 32] [--workdir /tmp/first_run]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN, SEED, RATIOS = 512, 0, (0.2, 0.4)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
PROMPTS = ["What is the capital of France? Answer in one sentence.", "Name three primary colors.",
           "Write one sentence about the ocean.", "What is 12 plus 7?"]


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine (/proc/stat) and of this process's children."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy, children.ru_utime + children.ru_stime


def cli(*args, **env: str) -> tuple[str, dict]:
    """Run `python -m vllm_pp.tools.cli ARGS` with this checkout first on the path: its stdout and
    timing (wall seconds; CPU seconds it used and other processes used meanwhile)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    (busy, own), started = cpu_seconds(), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vllm_pp.tools.cli", *map(str, args)], check=True, text=True,
                          stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path, **env})
    wall, (busy_end, own_end) = time.monotonic() - started, cpu_seconds()
    own_cpu = own_end - own
    return done.stdout.strip(), {"seconds": wall, "cpu_seconds": own_cpu,
                                 "others_cpu_seconds": max(0.0, busy_end - busy - own_cpu)}


def calibrate(model: str, sizes: list[int], workdir: Path, dtype: str) -> dict[int, dict]:
    """One calibration file per size, timed when this run makes it."""
    files = {}
    for n in sizes:
        out, timing = workdir / f"calibration-{n}x{SEQ_LEN}-seed{SEED}.safetensors", {"seconds": None}
        if not out.exists():
            print(f"calibrating {n} x {SEQ_LEN} -> {out}", flush=True)
            _, timing = cli("calibrate", "--model", model, "--out", out, "--num-samples", n,
                            "--seq-len", SEQ_LEN, "--seed", SEED, "--dtype", dtype,
                            VLLM_CPU_KVCACHE_SPACE="2")
        files[n] = {"file": str(out), **timing}
    return files


def perplexity(model: str, label: str, method: str, ratio: float, calibration: str | None,
               args: argparse.Namespace) -> dict:
    """`vllm-pp eval ppl` for one setting (its JSON, reused from --workdir when there)."""
    out = args.workdir / f"ppl-{label}-{args.num_windows}w-{args.dtype}.json"
    if not out.exists():
        print(f"evaluating {label} -> {out}", flush=True)
        extra = ["--calibration", calibration] if calibration else []
        _, timing = cli("eval", "ppl", "--model", model, "--method", method, "--ratio", ratio, *extra,
                        "--num-windows", args.num_windows, "--dtype", args.dtype, "--json", out)
        out.write_text(json.dumps({**json.loads(out.read_text()), "command_timing": timing}, indent=2))
    result = json.loads(out.read_text())
    return {k: result.get(k) for k in ("method", "ratio", "calibration", "perplexity", "seconds", "command_timing")}


def answers(model: str, config: dict) -> dict:
    """Greedy chat answers of one engine (in this process), shut down before returning."""
    import torch
    from vllm import SamplingParams

    from vllm_pp.tools.engine import vllm_engine

    started = time.monotonic()
    with vllm_engine(model, additional_config={"probe_pruning": config}, enforce_eager=True,
                     enable_prefix_caching=False, max_model_len=1024, seed=0) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=48)
        texts = [llm.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0].outputs[0].text
                 for p in PROMPTS]
        return {"config": config, "answers": dict(zip(PROMPTS, texts)), "dtype": str(llm.llm_engine.model_config.dtype),
                "torch_threads": torch.get_num_threads(), "seconds": time.monotonic() - started}


def engines(calibration: str) -> dict[str, dict]:
    return {"dense": {"ratio": 0.0}, "PP 0.4, no calibration": {"ratio": 0.4},
            "PP 0.2": {"ratio": 0.2, "calibration": calibration},
            "PP 0.4": {"ratio": 0.4, "calibration": calibration},
            "FLAP 0.4": {"ratio": 0.4, "method": "flap", "calibration": calibration}}


def cpu_features() -> dict:
    lines = dict(line.split(":", 1) for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if ":" in line)
    flags = set(lines.get("Flags", "").split())
    return {"model_name": lines.get("Model name", "").strip(), "cpus": os.cpu_count(),
            **{flag: flag in flags for flag in CPU_FLAGS}}


def protocol_parser(description: str, num_samples: int) -> argparse.ArgumentParser:
    """Options of a 128-window quality benchmark whose runs share one calibration file."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=num_samples,
                        help="calibration windows (256: the canonical protocol)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.2])
    parser.add_argument("--num-windows", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="dtype of calibration and evaluation")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/head_groups"), help="calibration files")
    parser.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    return parser


def shared_calibration(args: argparse.Namespace, name: str) -> tuple[str, Path, dict]:
    """The default model's path, ``args``' calibration file (made once in ``args.workdir``,
    random windows, seed SEED) and its timing (seconds None: made by an earlier run)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, _ = cli("model", "prepare", "--quiet")
    calibration = args.workdir / f"calibration-{args.num_samples}x{SEQ_LEN}-seed{SEED}.safetensors"
    timing = {"seconds": None}
    if not calibration.exists():
        print(f"[{name}] calibrating {args.num_samples} x {SEQ_LEN} -> {calibration}", file=sys.stderr, flush=True)
        _, timing = cli("calibrate", "--model", model, "--out", calibration, "--num-samples", args.num_samples,
                        "--seq-len", SEQ_LEN, "--seed", SEED, "--dtype", args.dtype, VLLM_CPU_KVCACHE_SPACE="2")
    return model, calibration, timing


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def others_share(timing: dict) -> str:
    """The share of the machine's CPU time other processes took while a command ran."""
    if timing.get("seconds") is None:
        return "-"
    return f"{timing['others_cpu_seconds'] / (timing['seconds'] * os.cpu_count()):.0%}"


def calibration_table(report: dict) -> str:
    ppl = report["perplexity"]
    best = ppl.get(f"probe:0.4:{max(report['calibration'], key=int)}", {}).get("perplexity")
    rows = ["| calibration samples | calibration s | CPU taken by other processes | PP 0.2 ppl | PP 0.4 ppl "
            "| PP 0.4 vs largest |", "|---|---|---|---|---|---|"]
    for n, calib in report["calibration"].items():
        p2, p4 = (ppl[f"probe:{r}:{n}"]["perplexity"] for r in RATIOS)
        rows.append(f"| {n} | {fmt(calib['seconds'], 0)} | {others_share(calib)} | {fmt(p2)} | {fmt(p4)} "
                    f"| {p4 / best - 1:+.1%} |")
    none, dense = ppl["probe:0.4:none"]["perplexity"], ppl["dense"]["perplexity"]
    rows.append(f"| none (PP 0.4) | 0 | - | - | {fmt(none)} | {none / best - 1:+.1%} |")
    rows.append(f"| dense | - | - | {fmt(dense)} | {fmt(dense)} | - |")
    return "\n".join(rows)


def answers_table(report: dict) -> str:
    cell = lambda text: " ".join(text.split()).replace("|", "\\|") or "(empty)"
    rows = ["| engine | " + " | ".join(PROMPTS) + " |", "|---" * (len(PROMPTS) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(cell(run["answers"][p]) for p in PROMPTS) + " |"
             for name, run in report["engines"].items()]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[16, 32, 64, 256])
    parser.add_argument("--num-windows", type=int, default=128)
    parser.add_argument("--answers-calibration-samples", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="dtype of calibration and evaluation")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/first_run"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])

    model, _ = cli("model", "prepare", "--quiet")
    texts, _ = cli("data", "prepare", "--quiet")
    print(f"model {model}\ntexts {' '.join(texts.split())}", flush=True)

    sizes = sorted(set(args.num_samples) | {args.answers_calibration_samples})
    calibrations = calibrate(model, sizes, args.workdir, args.dtype)
    runs = [("dense", "dense", 0.0, None), ("probe:0.4:none", "probe", 0.4, None)]
    runs += [(f"probe:{r}:{n}", "probe", r, c["file"]) for n, c in calibrations.items() for r in RATIOS]
    report = {"command": command, "model": model, "seq_len": SEQ_LEN, "seed": SEED,
              "num_windows": args.num_windows, "dtype": args.dtype, "cpu": cpu_features(),
              "calibration": calibrations,
              "perplexity": {label: perplexity(model, label, *run, args) for label, *run in runs}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_run_calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    print(calibration_table(report), flush=True)

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # In-process engine core, every core for torch (as `vllm-pp calibrate` and `eval` run).
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                      OMP_NUM_THREADS=str(os.cpu_count()))
    chosen = calibrations[args.answers_calibration_samples]["file"]
    spoken = {"command": command, "model": model, "calibration": chosen, "max_tokens": 48,
              "engines": {name: answers(model, config) for name, config in engines(chosen).items()}}
    (RESULTS / "first_run_answers.json").write_text(json.dumps(spoken, indent=2) + "\n")
    print(answers_table(spoken))
    return 0


if __name__ == "__main__":
    sys.exit(main())
