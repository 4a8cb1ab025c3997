"""The ``vllm-pp`` command line: ``vllm-pp <group> <command> [options]``.

Each group registers itself with an ``add_*_commands(subparsers)`` function and each
command sets ``handler``; add new groups (``calibrate``, ``eval``) the same way in
:func:`build_parser`. Handlers import their modules lazily so that ``--help`` is quick,
and nothing here imports vLLM.

A handler returns the lines to print on stdout (paths, one per line); progress and
warnings go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Everything the asset builders need is local or comes from PyPI; never wait on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# stdout carries the results (paths) only; vLLM's log lines go with the progress, to stderr.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-pp", description="Probe Pruning for vLLM: assets and tools.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    add_model_commands(groups)
    add_data_commands(groups)
    add_calibrate_command(groups)
    add_eval_commands(groups)
    return parser


def _command_group(groups: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    group = groups.add_parser(name, help=help)
    return group.add_subparsers(dest="command", metavar="COMMAND", required=True)


def _asset_command(commands: argparse._SubParsersAction, name: str, help: str, handler) -> argparse.ArgumentParser:
    """A command that builds (or verifies) a cached asset and prints its path(s)."""
    command = commands.add_parser(name, help=help)
    command.add_argument("--out", type=Path, help="output directory (default: in the cache)")
    command.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    command.set_defaults(handler=handler)
    return command


def add_model_commands(groups: argparse._SubParsersAction) -> None:
    from vllm_pp.tools.random_models import FAMILIES  # plain data, no torch import

    commands = _command_group(groups, "model", "prepare models")
    _asset_command(commands, "prepare", "build (or verify) the default SmolLM2-135M-Instruct model "
                   "and print its directory", _model_prepare)
    random = _asset_command(commands, "random", "build (or verify) a seeded random-weight model and "
                            "print its directory", _model_random)
    random.add_argument("--family", required=True, choices=list(FAMILIES))
    random.add_argument("--seed", type=int, default=0)


def add_data_commands(groups: argparse._SubParsersAction) -> None:
    commands = _command_group(groups, "data", "prepare text data")
    _asset_command(commands, "prepare", "build (or verify) the evaluation, calibration and held-out "
                   "text and print their paths (evaluation, calibration, held-out)", _data_prepare)


def add_calibrate_command(groups: argparse._SubParsersAction) -> None:
    calibrate = groups.add_parser(
        "calibrate", help="record the dense model's statistics for PP, FLAP and Wanda-sp")
    calibrate.add_argument("--model", required=True, help="model directory")
    calibrate.add_argument("--out", type=Path,
                           help="calibration file to write (default: one per model and settings in "
                                "the cache, made once and reused)")
    calibrate.add_argument("--text", type=Path,
                           help="calibration text (default: the prepared calibration text; needs --out)")
    calibrate.add_argument("--num-samples", type=_positive_int, default=256)
    calibrate.add_argument("--seq-len", type=_positive_int, default=512)
    calibrate.add_argument("--batch-size", type=_positive_int, default=8, help="windows per step")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    calibrate.add_argument("--distributed-executor-backend", choices=("mp", "ray"),
                           help="how TP workers run (vLLM's default: mp on one host)")
    calibrate.add_argument("--dtype", default="auto")
    calibrate.set_defaults(handler=_calibrate)


def add_eval_commands(groups: argparse._SubParsersAction) -> None:
    commands = _command_group(groups, "eval", "quality evaluation")
    ppl = commands.add_parser("ppl", help="perplexity over contiguous windows of the evaluation text")
    ppl.add_argument("--model", required=True, help="model directory")
    ppl.add_argument("--text", type=Path, help="evaluation text (default: the prepared one)")
    ppl.add_argument("--method", default="probe")
    ppl.add_argument("--ratio", type=float, default=0.0)
    ppl.add_argument("--calibration", type=Path)
    ppl.add_argument("--probe-ratio", type=float)
    ppl.add_argument("--seq-len", type=_positive_int, default=512)
    ppl.add_argument("--num-windows", type=_positive_int, default=128)
    ppl.add_argument("--batch-size", type=_positive_int, default=8, help="windows per step")
    ppl.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    ppl.add_argument("--dtype", default="auto")
    ppl.add_argument("--json", type=Path, help="write settings and result here")
    ppl.set_defaults(handler=_eval_ppl)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 1")
    return value


def _calibrate(args: argparse.Namespace) -> list[str]:
    from vllm_pp.tools.calibrate import calibrate, prepare_calibration
    from vllm_pp.tools.text_data import prepare_text

    settings = dict(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                    seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                    distributed_executor_backend=args.distributed_executor_backend)
    if args.out is None:
        if args.text is not None:
            raise ValueError(f"--text {str(args.text)!r} needs --out: the cache holds the prepared text's files only")
        return [str(prepare_calibration(Path(args.model), **settings))]
    text = args.text or prepare_text(quiet=True).calibration
    return [calibrate(args.model, args.out, text=text, **settings)["out"]]


def _eval_ppl(args: argparse.Namespace) -> list[str]:
    import json

    from dataclasses import asdict

    from vllm_pp.tools.evaluate import PerplexityRun, evaluate_perplexity
    from vllm_pp.tools.text_data import prepare_text

    run = PerplexityRun(
        model=args.model, text=str(args.text or prepare_text(quiet=True).evaluation),
        method=args.method, ratio=args.ratio,
        calibration=str(args.calibration) if args.calibration else None,
        probe_ratio=args.probe_ratio, seq_len=args.seq_len, num_windows=args.num_windows,
        batch_size=args.batch_size, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype)
    result = asdict(evaluate_perplexity(run))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return [f"perplexity {result['perplexity']:.4f} ({result['method']}, ratio {result['ratio']})"]


def _model_prepare(args: argparse.Namespace) -> list[Path]:
    from vllm_pp.tools.default_model import prepare_default_model

    return [prepare_default_model(args.out, quiet=args.quiet)]


def _model_random(args: argparse.Namespace) -> list[Path]:
    from vllm_pp.tools.random_models import build_random_model

    return [build_random_model(args.family, args.out, seed=args.seed, quiet=args.quiet)]


def _data_prepare(args: argparse.Namespace) -> list[Path]:
    from vllm_pp.tools.text_data import prepare_text

    paths = prepare_text(args.out, quiet=args.quiet)
    return [paths.evaluation, paths.calibration, paths.heldout]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = args.handler(args)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"vllm-pp: error: {error}", file=sys.stderr)
        return 1
    for path in results:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
