"""What a frozen history costs: PP learning while it serves against PP with history.update false.

Runs `vllm-pp eval ppl`'s protocol (the first 128 contiguous 512-token windows of
the evaluation text, 8 windows per step, float32) for PP at each ratio twice on
one calibration file: the default, whose history learns from every step, and the
frozen history, loaded from the calibration and never updated (the mode for
repeatable outputs). Writes benchmarks/results/frozen_history_<date>.json.

    python benchmarks/frozen_history.py --calibration FILE [--ratios 0.2 0.4]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import write_results

from vllm_pp.tools.default_model import prepare_default_model
from vllm_pp.tools.evaluate import PerplexityRun, evaluate_perplexity
from vllm_pp.tools.text_data import prepare_text

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", required=True, help="a `vllm-pp calibrate` file of the default model")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4])
    parser.add_argument("--num-windows", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / f"frozen_history_{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    model = str(prepare_default_model(quiet=True))
    text = str(prepare_text(quiet=True).evaluation)
    runs = {}
    for ratio in args.ratios:
        for mode, update in (("learning", True), ("frozen", False)):
            run = PerplexityRun(model=model, text=text, method="probe", ratio=ratio, seq_len=512,
                                num_windows=args.num_windows, batch_size=8, calibration=args.calibration,
                                probe_ratio=None, tensor_parallel_size=1, dtype="float32")
            runs[f"{ratio}:{mode}"] = asdict(evaluate_perplexity(run, {"history": {"update": update}}))
            print(f"PP {ratio} {mode}: {runs[f'{ratio}:{mode}']['perplexity']:.2f}", flush=True)
    write_results(args.out, {
        "command": "python " + shlex.join(["benchmarks/frozen_history.py", *sys.argv[1:]]),
        "runs": runs,
        "frozen_over_learning": {
            str(r): runs[f"{r}:frozen"]["perplexity"] / runs[f"{r}:learning"]["perplexity"] for r in args.ratios
        },
    })


if __name__ == "__main__":
    main()
