"""Every runtime patch vllm-pp applies to vLLM, in one place.

vLLM has no supported hook for a plugin to add engine flags, so the plugin
wraps two ``EngineArgs`` methods (each wrap is checked by a test in
``tests/test_runtime_patches.py``; ``patches/`` holds the upstream-style diff
that would make it unnecessary):

* ``EngineArgs.add_cli_args``: adds the "ProbePruning" group (``--pp-ratio``,
  ``--pp-method``, ...) to every parser that builds engine flags (``vllm serve``,
  ``vllm bench throughput|latency``).
* ``EngineArgs.from_cli_args``: folds those flags into
  ``additional_config["probe_pruning"]``, the only setting that reaches every
  worker.
* ``EngineArgs.create_engine_config``: validates the probe-pruning settings
  before any process starts and forces eager mode when pruning is on, because
  per-step decisions cannot live inside torch.compile or CUDA graphs.

Each wrap is applied once per process, and only if the wrapped attribute exists
(otherwise a warning is logged and ``--additional-config`` still works).
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any, Callable

from vllm_pp.config import ADDITIONAL_CONFIG_KEY, ProbePruningConfig, ProbePruningConfigError

_WRAPPED = "__probe_pruning_wrapped__"


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
    return text


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
    ("--pp-calibration", "calibration", str,
     "Probe pruning: calibration statistics file written by `vllm-pp calibrate`."),
    ("--pp-skip-layers", "skip_layers", _checked(_skip_layers),
     "Probe pruning: comma-separated decoder layers never pruned (default 0,1,2)."),
)


def _dest(flag: str) -> str:
    return "probe_pruning_" + flag.removeprefix("--pp-").replace("-", "_")


def add_probe_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ProbePruning", "Dynamic structured pruning by vllm-pp (Probe Pruning, ICLR 2025)."
    )
    for flag, _, parse, help_text in CLI_FLAGS:
        group.add_argument(flag, dest=_dest(flag), type=parse, default=None, help=help_text)


def fold_cli_flags(args: argparse.Namespace, additional_config: dict | None) -> dict | None:
    """Return ``additional_config`` with the ``--pp-*`` flags folded in.

    A flag that contradicts the same setting given in ``--additional-config``
    is an error rather than a silent override.
    """
    given = {
        key: getattr(args, _dest(flag))
        for flag, key, _, _ in CLI_FLAGS
        if getattr(args, _dest(flag), None) is not None
    }
    if not given:
        return additional_config
    merged = dict(additional_config or {})
    section = dict(merged.get(ADDITIONAL_CONFIG_KEY) or {})
    for dotted, value in given.items():
        node = section
        *parents, leaf = dotted.split(".")
        for name in parents:
            node[name] = dict(node.get(name) or {})
            node = node[name]
        if leaf in node and node[leaf] != value:
            raise ProbePruningConfigError(
                f"--pp-{dotted.split('.')[-1].replace('_', '-')} {value!r} contradicts "
                f"--additional-config {ADDITIONAL_CONFIG_KEY}.{dotted}={node[leaf]!r}"
            )
        node[leaf] = value
    merged[ADDITIONAL_CONFIG_KEY] = section
    return merged


def _wrap_once(owner: type, name: str, make: Callable[[Callable], Callable]) -> bool:
    original = owner.__dict__.get(name)
    if original is None:
        return False
    function = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    if getattr(function, _WRAPPED, False):
        return True
    wrapped = functools.wraps(function)(make(function))
    setattr(wrapped, _WRAPPED, True)
    if isinstance(original, staticmethod):
        wrapped = staticmethod(wrapped)
    elif isinstance(original, classmethod):
        wrapped = classmethod(wrapped)
    setattr(owner, name, wrapped)
    return True


def _patch_add_cli_args(add_cli_args: Callable) -> Callable:
    def add_cli_args_with_probe_pruning(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        add_probe_pruning_arguments(parser)
        return parser

    return add_cli_args_with_probe_pruning


def _patch_from_cli_args(from_cli_args: Callable) -> Callable:
    def from_cli_args_with_probe_pruning(cls, args):
        engine_args = from_cli_args(cls, args)
        engine_args.additional_config = fold_cli_flags(args, engine_args.additional_config)
        return engine_args

    return from_cli_args_with_probe_pruning


def _patch_create_engine_config(create_engine_config: Callable) -> Callable:
    from vllm.logger import init_logger

    logger = init_logger("vllm_pp")

    def create_engine_config_with_probe_pruning(self, *args, **kwargs):
        config = ProbePruningConfig.from_additional_config(self.additional_config)
        if config.enabled and not self.enforce_eager:
            logger.info(
                "Probe pruning (ratio %.2f) sets enforce_eager=True: per-step pruning "
                "decisions cannot run inside torch.compile or CUDA graphs.",
                config.ratio,
            )
            self.enforce_eager = True
        return create_engine_config(self, *args, **kwargs)

    return create_engine_config_with_probe_pruning


def install_runtime_patches() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import init_logger

    for name, make in (
        ("add_cli_args", _patch_add_cli_args),
        ("from_cli_args", _patch_from_cli_args),
        ("create_engine_config", _patch_create_engine_config),
    ):
        if not _wrap_once(EngineArgs, name, make):
            init_logger("vllm_pp").warning(
                "vllm-pp: EngineArgs.%s not found in this vLLM; the --pp-* flags are "
                "unavailable, use --additional-config '{\"probe_pruning\": {...}}'.",
                name,
            )
