"""The ``--pp-*`` flags: defined once, parsed into one-line errors, folded into the config.

Every flag is a shorthand for a key of ``additional_config["probe_pruning"]``
(vllm_pp/config.py), the only setting that reaches every worker (mp, tensor
parallel, Ray). vllm_pp/integration/runtime_patches.py adds them to vLLM's
engine-argument parsers and folds them in.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from vllm_pp.config import ADDITIONAL_CONFIG_KEY, ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods import method_class


def _checked(build: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a config validation error into argparse's one-line error."""

    def parse(text: str) -> Any:
        try:
            return build(text)
        except ProbePruningConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _float(setting: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProbePruningConfigError(
            f"probe_pruning.{setting}={text!r} is invalid: expected a number"
        ) from None
    if math.isnan(value):
        raise ProbePruningConfigError(
            f"probe_pruning.{setting}={text!r} is invalid: expected a number, not NaN"
        )
    return value


def _ratio(text: str) -> float:
    value = _float("ratio", text)
    ProbePruningConfig(ratio=value)
    return value


def _probe_ratio(text: str) -> float:
    value = _float("probe.ratio", text)
    ProbePruningConfig.from_dict({"probe": {"ratio": value}})
    return value


def _method(text: str) -> str:
    ProbePruningConfig(method=text)
    if ":" not in text:  # an out-of-tree method is imported at start-up validation
        method_class(text)
    return text


def _reuse_decode_steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ProbePruningConfigError(
            f"probe_pruning.reuse_decode_steps={text!r} is invalid: expected an integer >= 0"
        ) from None
    ProbePruningConfig(reuse_decode_steps=value)
    return value


def _checkpoint_seconds(text: str) -> float:
    value = _float("history.checkpoint_seconds", text)
    ProbePruningConfig.from_dict({"history": {"checkpoint_seconds": value}})
    return value


def _skip_layers(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ProbePruningConfigError(
            f"probe_pruning.skip_layers={text!r} is invalid: expected comma-separated "
            "layer indices such as 0,1,2 (empty for none)"
        )
    return [int(p) for p in parts]


# (flag, dotted key inside additional_config["probe_pruning"], type, help)
CLI_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--pp-ratio", "ratio", _checked(_ratio),
     "Probe pruning: share of attention heads and MLP channels pruned per step, "
     "in [0, 1). 0 (default) serves the model unpruned. Forces --enforce-eager."),
    ("--pp-method", "method", _checked(_method),
     "Probe pruning: how heads and channels are chosen."),
    ("--pp-probe-ratio", "probe.ratio", _checked(_probe_ratio),
     "Probe pruning: share of a step's tokens that run ahead as the probe, in (0, 1]."),
    ("--pp-reuse-decode-steps", "reuse_decode_steps", _checked(_reuse_decode_steps),
     "Probe pruning: a decision stands for up to this many following decode-only steps "
     "of the same requests (default 15; 0 decides at every step)."),
    ("--pp-calibration", "calibration", str,
     "Probe pruning: calibration statistics file written by `vllm-pp calibrate`."),
    ("--pp-skip-layers", "skip_layers", _checked(_skip_layers),
     "Probe pruning: comma-separated decoder layers never pruned (default 0,1,2)."),
    ("--pp-history", "history.path", str,
     "Probe pruning: directory of the live history, files per TP rank; the newest "
     "round every rank holds is loaded at start-up, rounds are written while serving "
     "(--pp-history-checkpoint-seconds) and at clean shutdown."),
    ("--pp-history-checkpoint-seconds", "history.checkpoint_seconds", _checked(_checkpoint_seconds),
     "Probe pruning: seconds between history checkpoints to --pp-history while serving "
     "(default 300; 0: only at clean shutdown)."),
    ("--pp-history-update", "history.update", bool,
     "Probe pruning: learn the history while serving (default). --no-pp-history-update "
     "freezes it: the same batch then gets the same outputs at any time."),
)


def _dest(flag: str) -> str:
    return "probe_pruning_" + flag.removeprefix("--pp-").replace("-", "_")


def add_probe_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ProbePruning", "Dynamic structured pruning by vllm-pp (Probe Pruning, ICLR 2025)."
    )
    for flag, _, parse, help_text in CLI_FLAGS:
        if parse is bool:  # --flag / --no-flag, as vLLM's own switches
            group.add_argument(flag, dest=_dest(flag), action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=_dest(flag), type=parse, default=None, help=help_text)


def fold_cli_flags(args: argparse.Namespace, additional_config: dict | None) -> dict | None:
    """Return ``additional_config`` with the ``--pp-*`` flags folded in.

    A flag that contradicts the same setting given in ``--additional-config``
    is an error rather than a silent override.
    """
    given = {
        key: (flag, getattr(args, _dest(flag)))
        for flag, key, _, _ in CLI_FLAGS
        if getattr(args, _dest(flag), None) is not None
    }
    if not given:
        return additional_config
    merged = dict(additional_config or {})
    section = dict(merged.get(ADDITIONAL_CONFIG_KEY) or {})
    for dotted, (flag, value) in given.items():
        node = section
        *parents, leaf = dotted.split(".")
        for name in parents:
            node[name] = dict(node.get(name) or {})
            node = node[name]
        if leaf in node and node[leaf] != value:
            raise ProbePruningConfigError(
                f"{flag} {value!r} contradicts "
                f"--additional-config {ADDITIONAL_CONFIG_KEY}.{dotted}={node[leaf]!r}"
            )
        node[leaf] = value
    merged[ADDITIONAL_CONFIG_KEY] = section
    return merged
