"""Ways to run one pruned MLP block, timed against vLLM's dense GEMM on this CPU.

For a LLaMA MLP (gate_up [2I, H], down [H, I]) keeping 56% of the channels
(PP's r' = 0.44), per number of tokens T, median milliseconds of:

* ``dense oneDNN``: vLLM's own path (weights prepacked by oneDNN at load);
* ``gather + F.linear``: the first design, index_select of the kept rows and
  columns every step, then the two GEMMs;
* ``swap 14% + oneDNN``: what vllm_pp/execution.py does: packed kept rows
  updated in place for the units that changed (14% of them, PP's median
  change between decode steps on SmolLM2), then oneDNN's matmul on the plain
  packed rows (``torch.ops.mkldnn._linear_pointwise``);
* ``packed oneDNN``: those GEMMs alone (a reused decision: nothing moves);
* ``packed F.linear``: the same GEMMs through ``F.linear`` (MKL);
* ``packed oneDNN prepacked``: through vLLM's prepacked oneDNN handler, and
  ``oneDNN prepack``: what prepacking the packed rows costs once;
* ``MLP probe, 1 token``: what a deciding decode step adds, the probe token
  through the whole gate_up (it reads every gate_up row however few tokens);
* ``dense gate_up + packed down``: the alternative for small steps, one dense
  gate_up for every token (the probe's rows would come from it) and down on
  the kept columns;
* ``packed, down [H, K] contiguous``: the packed GEMMs with down's kept
  columns stored output-major (F.linear's layout) instead of as rows (the
  layout that makes swaps row copies), to price the layout.

One thread (a vLLM CPU worker on this 2-core machine computes on one core),
float32. Variants are interleaved within each repeat.

    python benchmarks/gemm_paths.py --width 7b   # hidden 4096, intermediate 11008
    python benchmarks/gemm_paths.py --width smollm2

Writes benchmarks/results/gemm_paths_<width>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = {"7b": (4096, 11008), "smollm2": (576, 1536)}
KEEP, CHANGE = 0.56, 0.14


def variants(hidden: int, width: int, tokens: int):
    from vllm import _custom_ops as ops

    from vllm_pp.runtime.execution import PackedUnits, linear

    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * width, hidden, generator=generator) * 0.02
    down_rows = torch.randn(width, hidden, generator=generator) * 0.02  # down^T, as stored
    down = down_rows.t()
    dense_gate_up = ops.create_onednn_mm(gate_up.t(), 32)
    dense_down = ops.create_onednn_mm(down.t(), 32)
    keep = int(width * KEEP) // 64 * 64
    decisions = []
    kept = torch.randperm(width, generator=generator)[:keep].sort().values
    for _ in range(8):  # overlapping decisions, CHANGE of the units swapped each time
        pruned = torch.ones(width, dtype=torch.bool)
        pruned[kept] = False
        out = torch.randperm(keep, generator=generator)[: int(keep * CHANGE)]
        stay = torch.ones(keep, dtype=torch.bool)
        stay[out] = False
        entering = pruned.nonzero().squeeze(1)[torch.randperm(int(pruned.sum()), generator=generator)[: out.numel()]]
        kept = torch.cat([kept[stay], entering]).sort().values
        decisions.append(kept)
    packed = PackedUnits([gate_up.view(2, width, hidden), down_rows.unsqueeze(0)], 1)
    packed.load(decisions[-1])
    x = torch.randn(tokens, hidden, generator=generator)
    state = {"step": 0}

    def act(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def dense_onednn():
        ops.onednn_mm(dense_down, act(ops.onednn_mm(dense_gate_up, x, None)), None)

    def gather():
        kept = decisions[0]
        rows = torch.cat([kept, kept + width])
        torch.mm(act(F.linear(x, gate_up.index_select(0, rows))), down_rows.index_select(0, kept))

    def packed_gemms():
        packed.input_rows(1, act(packed.output_rows(0, x)))

    down_output_major = packed.packed[1][0].t().contiguous()  # [H, K]

    def packed_output_major():
        linear(act(packed.output_rows(0, x)), down_output_major)

    def probe_one_token():
        linear(x[:1], gate_up)

    def dense_gate_up_packed_down():
        intermediate = act(linear(x, gate_up)).index_select(1, packed.slot_rows)
        packed.input_rows(1, intermediate)

    def packed_mkl():
        torch.mm(act(F.linear(x, packed.packed[0].view(-1, hidden))), packed.packed[1][0])

    def swap():
        state["step"] += 1
        packed.load(decisions[state["step"] % len(decisions)])
        packed_gemms()

    handles = {}

    def prepack():
        handles["gate_up"] = ops.create_onednn_mm(packed.packed[0].view(-1, hidden).t(), 32)
        handles["down"] = ops.create_onednn_mm(packed.packed[1][0], 32)

    def packed_onednn():
        ops.onednn_mm(handles["down"], act(ops.onednn_mm(handles["gate_up"], x, None)), None)

    prepack()
    return {
        "dense oneDNN": dense_onednn, "gather + F.linear": gather, "swap 14% + oneDNN": swap,
        "packed oneDNN": packed_gemms, "packed F.linear": packed_mkl,
        "packed oneDNN prepacked": packed_onednn, "oneDNN prepack": prepack,
        "MLP probe, 1 token": probe_one_token,
        "dense gate_up + packed down": dense_gate_up_packed_down,
        "packed, down [H, K] contiguous": packed_output_major,
    }


def measure(hidden: int, width: int, tokens: int, repeats: int) -> dict[str, float]:
    runs = variants(hidden, width, tokens)
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(1e3 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", choices=list(WIDTHS), default="7b")
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 8, 16, 64, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hidden, width = WIDTHS[args.width]
    results = {"hidden": hidden, "intermediate": width, "keep": KEEP, "change": CHANGE,
               "unit": "ms (median)", "tokens": {}}
    for tokens in args.tokens:
        results["tokens"][tokens] = measure(hidden, width, tokens, args.repeats)
        print(f"[gemm_paths] T={tokens}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in results["tokens"][tokens].items()), file=sys.stderr, flush=True)
    out = RESULTS / f"gemm_paths_{args.width}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
