"""Per-step cost of the pruned path on a stack of decoder-layer blocks, with torch alone.

Runs the project's own runtime (vllm_pp/tools/block_stack.py: the step view,
probe, scores, selection, packed weights, pruned GEMMs, history update) on the
attention-output and MLP blocks of a layer stack (default: LLaMA-2-7B widths,
32 layers, the first 3 unpruned), for steps of several sizes:

* ``dense``: every unit, as vLLM runs it (no pruning machinery);
* ``pp-every-step``: PP at the ratio, deciding at every step;
* ``pp-reuse``: PP at its default decision reuse (decode-only steps keep a
  decision for up to ``reuse_decode_steps`` steps; prefill steps decide);
* ``static``: a decision fixed at load time (FLAP's and Wanda-sp's cost);
* ``pp-reuse-gathered``: ``pp-reuse`` with GEMMs that read the kept rows in place
  (vllm_pp/runtime/gather_gemm.py) instead of packed copies.

Steps of at most 64 tokens are decode-only steps (one token per request, 1k
of context); larger ones are 1024-token prefill chunks. Each engine is timed
eagerly and, on CUDA, replayed from a CUDA graph captured for that step
(``pp-reuse``: a deciding graph and a reusing one, weighted as the reuse
cycle runs them). Also reported: host synchronisations per step (counted on
any device; on CUDA checked again with torch's sync debug mode), whether the
replayed graph gives the eager outputs, and the weight memory the pruned path
adds.

    python benchmarks/gpu_step.py                          # CUDA, bf16, 7B widths
    python benchmarks/gpu_step.py --device cpu --dtype float32 --shape small --capturable

Writes benchmarks/results/gpu_step_<device>_<shape>.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from common import median_ms, write_results  # benchmarks/ is on sys.path when run as a script

from vllm_pp.config import ProbePruningConfig
from vllm_pp.tools.block_stack import BlockStack, StackShape, StepInputs, step_inputs, synchronisations

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "7b": StackShape(),
    "small": StackShape(hidden=256, heads=4, head_dim=64, intermediate=512, layers=4, skip_layers=(0,)),
    # The test suite's: Triton's interpreter runs the gathered engine's kernels on the CPU.
    "tiny": StackShape(hidden=64, heads=2, head_dim=32, intermediate=128, layers=2, skip_layers=(0,)),
}
DECODE_CONTEXT, PREFILL_CHUNK = 1024, 1024
ENGINES = ("dense", "pp-every-step", "pp-reuse", "static", "pp-reuse-gathered")


def log(message: str) -> None:
    print(f"[gpu_step] {message}", file=sys.stderr, flush=True)


def config_of(engine: str, ratio: float, shape: StackShape, reuse: int | None = None) -> ProbePruningConfig:
    settings = {"ratio": 0.0 if engine == "dense" else ratio, "skip_layers": list(shape.skip_layers)}
    if engine == "pp-every-step":
        settings["reuse_decode_steps"] = 0
    elif engine == "static":
        settings["method"] = "trivial_selection:FirstUnits"  # benchmarks/ is on sys.path
    if reuse is not None:
        settings["reuse_decode_steps"] = reuse
    return ProbePruningConfig.from_dict(settings)


def inputs_of(shape: StackShape, tokens: int, seed: int, **tensor) -> StepInputs:
    """A decode-only step of ``tokens`` requests, or 1024-token prefill chunks."""
    if tokens <= 64:
        query, context = [1] * tokens, [DECODE_CONTEXT] * tokens
    else:
        query = [min(PREFILL_CHUNK, tokens - start) for start in range(0, tokens, PREFILL_CHUNK)]
        context = [0] * len(query)
    return step_inputs(shape, query, context, torch.Generator().manual_seed(seed), **tensor)


def graphed(call):
    """``call`` captured once in a CUDA graph: (replay, the captured output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    return graph.replay, output


def count_syncs(call) -> int:
    names: list[str] = []
    with synchronisations(names.append):
        call()
    return len(names)


def run_engine(engine: str, shape: StackShape, args, timer, **tensor) -> tuple[dict, float | None]:
    """One engine at every step size: per size eager (and graphed) ms, syncs, memory; and
    (CUDA) the graph check. Stacks are built once per engine (weights of 7B widths take time)."""

    def make(reuse: int | None = None) -> BlockStack:
        config = config_of(engine, args.ratio, shape, reuse)
        return BlockStack(shape, config, capturable=args.capturable, gathered=engine.endswith("-gathered"),
                          seed=0, **tensor)

    def step_of(stack: BlockStack):
        return stack.dense_step if engine == "dense" else stack.step

    cuda = tensor["device"].type == "cuda"
    stack, runs = make(), {}
    step = step_of(stack)
    # pp-reuse at decode steps, graphed: a deciding graph and a reusing one, weighted as the cycle runs them.
    deciding = reusing = None
    for tokens in args.tokens:
        inputs = inputs_of(shape, tokens, seed=tokens, **tensor)
        run = {"syncs_per_step": count_syncs(lambda: step(inputs))}
        # pp-reuse at decode steps: a decision, then ``reuse_decode_steps`` steps keeping it.
        cycle = stack.pruning.config.reuse_decode_steps + 1 if engine.startswith("pp-reuse") and tokens <= 64 else 1
        run["eager_ms"] = timer(lambda: [step(inputs) for _ in range(cycle)]) / cycle
        run["extra_weight_bytes"] = stack.extra_weight_bytes()
        run["stack_weight_bytes"] = stack.weight_bytes()
        if cuda:
            run["sync_debug_mode"] = sync_debug_check(lambda: step(inputs))
            if cycle == 1:
                run["graphed_ms"] = timer(graphed(lambda: step(inputs))[0])
            else:
                deciding, reusing = deciding or make(reuse=0), reusing or make(reuse=10**9)
                decide_ms = timer(graphed(lambda: deciding.step(inputs))[0])
                reuse_ms = timer(graphed(lambda: reusing.step(inputs))[0])
                run["graphed_ms"] = (decide_ms + (cycle - 1) * reuse_ms) / cycle
        runs[str(tokens)] = run
        log(f"{engine} {tokens} tokens: {run}")
    stack = deciding = reusing = None  # freed before the graph check builds its twins
    difference = graph_difference(make, step_of, inputs_of(shape, args.tokens[0], seed=0, **tensor)) if cuda else None
    return runs, difference


def sync_debug_check(call) -> str:
    """torch's own check on CUDA: does ``call`` synchronise?"""
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        return "no synchronisation"
    except RuntimeError as error:
        return f"synchronised: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_difference(make, step_of, inputs: StepInputs) -> float:
    """Largest difference between replaying a captured step and computing it eagerly,
    on twin stacks (same seed, same warm-up steps) given the same new inputs."""
    eager, captured = make(), make()
    static = StepInputs(inputs.hidden.clone(), inputs.attention.clone(), inputs.metadata, inputs.positions)
    for _ in range(3):  # graphed() runs three warm-up steps before it captures
        step_of(eager)(static)
    replay, output = graphed(lambda: step_of(captured)(static))
    differences = []
    for seed in range(3):
        fresh = torch.Generator(device=static.hidden.device).manual_seed(100 + seed)
        static.hidden.copy_(torch.randn(static.hidden.shape, generator=fresh, device=static.hidden.device))
        static.attention.copy_(torch.randn(static.attention.shape, generator=fresh, device=static.hidden.device))
        replay()
        differences.append((output.float() - step_of(eager)(static).float()).abs().max().item())
    return max(differences)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shape", default="7b", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--capturable", action=argparse.BooleanOptionalAction, default=None,
                        help="the runtime's capturable step path (default: on CUDA, not on the CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the gathered engine's kernels, before they are made
    tensor = {"device": device, "dtype": getattr(torch, args.dtype)}
    shape = SHAPES[args.shape]
    def timer(call) -> float:
        return median_ms(call, device, args.repeats)


    started = time.monotonic()
    results = {
        "command": " ".join(["python", "benchmarks/gpu_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "shape": vars(shape) | {"skip_layers": list(shape.skip_layers)},
        "ratio": args.ratio, "repeats": args.repeats, "capturable": args.capturable, "timing": "CUDA events, median" if device.type == "cuda"
        else "wall time, median", "l2_flushed": False, "engines": {}, "graph_max_abs_difference": {},
    }
    with torch.inference_mode():
        for engine in args.engines:
            runs, difference = run_engine(engine, shape, args, timer, **tensor)
            results["engines"][engine] = runs
            if difference is not None:
                results["graph_max_abs_difference"][engine] = difference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_ratios(results)
    results["seconds"] = time.monotonic() - started
    out = write_results(args.out or RESULTS / f"gpu_step_{device.type}_{args.shape}.json", results)
    plot(results, out.with_suffix(".png"))
    return 0


def add_ratios(results: dict) -> None:
    """Dense time over each engine's (higher is faster), eager against eager, graphed against graphed."""
    dense = results["engines"].get("dense")
    if dense is None:
        return
    for runs in results["engines"].values():
        for tokens, run in runs.items():
            for mode in ("eager_ms", "graphed_ms"):
                if mode in run and mode in dense[tokens]:
                    run[f"speedup_{mode[:-3]}"] = dense[tokens][mode] / run[mode]


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for engine, runs in results["engines"].items():
        tokens = [int(t) for t in runs]
        for mode, style in (("eager_ms", "-"), ("graphed_ms", "--")):
            values = [run.get(mode) for run in runs.values()]
            if all(v is not None for v in values):
                ax.plot(tokens, values, style, marker="o", label=f"{engine} ({mode[:-3]})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the step")
    ax.set_ylabel("ms per step (attention output + MLP, all layers)")
    ax.set_title(f"{results['device']}, {results['dtype']}, ratio {results['ratio']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
