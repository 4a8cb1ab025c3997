"""Kill drill on the default model: what kill -9 of a serving `vllm serve --pp-history` loses.

Serves SmolLM2-135M-Instruct (PP 0.4, float32) under a steady load of greedy
completions, kills the server with SIGKILL at a random moment --kills times and
restarts it on the same history directory each time (vllm_pp/tools/kill_drill.py).
Per kill it records the round every rank loaded, how old it was at the kill and
how many served steps it lacked, and checks that every history file on disk is
complete. Writes benchmarks/results/crash_recovery_<date>.json with the command.

    python benchmarks/crash_recovery.py [--kills 8] [--checkpoint-seconds 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

from vllm_pp.tools.default_model import prepare_default_model
from vllm_pp.tools.kill_drill import Drill

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--checkpoint-seconds", type=float, default=5.0)
    parser.add_argument("--serve-seconds", type=float, nargs=2, default=(6.0, 20.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / f"crash_recovery_{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    model = str(prepare_default_model(quiet=True))
    work = Path(tempfile.mkdtemp(prefix="vllm-pp-kill-drill-"))
    drill = Drill(
        serve_args=[model, "--pp-ratio", "0.4", "--dtype", "float32", "--max-model-len", "1024",
                    "--max-num-seqs", "8", "--no-enable-prefix-caching"],
        history=work / "history", work_dir=work / "drill", kills=args.kills,
        checkpoint_seconds=args.checkpoint_seconds, serve_seconds=tuple(args.serve_seconds),
        seed=args.seed, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    report = drill.run()
    kills = report["kills"]
    summary = {
        "kills": len(kills),
        "max_lost_seconds": max(k["lost_seconds"] for k in kills),
        "max_lost_steps": max(k["lost_steps"] for k in kills),
        # Every history file on disk after each kill, read in full (a torn one stops the drill).
        "round_files_read_in_full": sum(len(rounds) for k in kills for rounds in k["held_after_kill"].values()),
    }
    write_results(args.out, {
        "command": "python " + shlex.join(["benchmarks/crash_recovery.py", *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct", "summary": summary, **report,
    })
    print(f"{summary['kills']} kills, checkpoint every {args.checkpoint_seconds:g} s: lost at most "
          f"{summary['max_lost_seconds']:.1f} s / {summary['max_lost_steps']} steps of learning")


if __name__ == "__main__":
    main()
