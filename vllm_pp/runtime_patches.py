"""Every runtime patch vllm-pp applies to vLLM, in one place.

vLLM has no supported hook for what these do, so the plugin wraps a few of its
methods (each wrap is checked by a test in ``tests/test_runtime_patches.py``;
``patches/`` holds the upstream-style diff that would make it unnecessary):

* ``EngineArgs.add_cli_args`` (patches/0002): adds the "ProbePruning" group
  (``--pp-ratio``, ``--pp-method``, ...) to every parser that builds engine
  flags (``vllm serve``, ``vllm bench throughput|latency``).
* ``EngineArgs.from_cli_args`` (0002): folds those flags into
  ``additional_config["probe_pruning"]``, the only setting that reaches every
  worker.
* ``EngineArgs.create_engine_config`` (0002): forces eager mode when pruning is
  on (per-step decisions cannot live inside torch.compile or CUDA graphs), gives
  ``--pp-history`` a shutdown grace period, validates the set-up against the
  config vLLM built (vllm_pp/validation.py) before any process starts, and, in
  the process that builds the config (the API server), prepares the workers'
  metrics snapshot directory and the collector that puts
  ``vllm:probe_pruning_*`` on ``/metrics`` (vllm_pp/metrics.py; vLLM's
  stat-logger plugins only see engine-core stats, never the workers').
* ``EngineCore.shutdown`` (0004): saves ``--pp-history`` on every worker before
  the executor stops them.
* ``Executor.get_class`` (0003): on vLLM's CPU platform, runs the Ray backend
  with ``vllm_pp.ray_on_cpu``'s executor, since vLLM refuses Ray there.
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


def _reuse_decode_steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ProbePruningConfigError(
            f"probe_pruning.reuse_decode_steps={text!r} is invalid: expected an integer >= 0"
        ) from None
    ProbePruningConfig(reuse_decode_steps=value)
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
     "Probe pruning: directory of the live history, one file per TP rank; loaded at "
     "start-up when present, saved at clean shutdown."),
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


# Grace period for a clean shutdown when --pp-history must be saved (vLLM's
# default, 0, force-kills the engine core on SIGTERM).
HISTORY_SHUTDOWN_TIMEOUT_S = 30


def _patch_create_engine_config(create_engine_config: Callable) -> Callable:
    from vllm.logger import init_logger

    logger = init_logger("vllm.probe_pruning")
    # vLLM's command-line servers, by usage context. There a set-up pruning cannot
    # serve ends the process with one line, as a bad flag does in argparse; Python
    # callers (LLM, AsyncLLM) get the exception.
    commands = {
        "OPENAI_API_SERVER": "vllm serve",
        "OPENAI_BATCH_RUNNER": "vllm run-batch",
        "API_SERVER": "vllm api_server",
    }

    def create_engine_config_with_probe_pruning(self, *args, **kwargs):
        from vllm_pp.metrics import prepare_server_metrics
        from vllm_pp.validation import validate_engine_config

        usage_context = kwargs.get("usage_context", args[0] if args else None)
        try:
            config = ProbePruningConfig.from_additional_config(self.additional_config)
            if config.enabled and not self.enforce_eager:
                logger.info(
                    "Probe pruning (ratio %.2f) sets enforce_eager=True: per-step pruning "
                    "decisions cannot run inside torch.compile or CUDA graphs.",
                    config.ratio,
                )
                self.enforce_eager = True
            if config.enabled and config.history.path and not self.shutdown_timeout:
                logger.info(
                    "Probe pruning (--pp-history) sets shutdown_timeout=%d s: with 0, vLLM "
                    "kills the engine on SIGTERM before the history can be saved.",
                    HISTORY_SHUTDOWN_TIMEOUT_S,
                )
                self.shutdown_timeout = HISTORY_SHUTDOWN_TIMEOUT_S
            vllm_config = create_engine_config(self, *args, **kwargs)
            # Checked against what vLLM resolved (architecture, TP size, quantization,
            # LoRA) before any engine process starts.
            validate_engine_config(config, vllm_config)
            prepare_server_metrics(vllm_config)
        except ProbePruningConfigError as err:
            command = commands.get(getattr(usage_context, "value", usage_context))
            if command is None:
                raise
            # SystemExit prints its message on stderr and exits with status 1.
            raise SystemExit(f"{command}: error: {err}") from None
        return vllm_config

    return create_engine_config_with_probe_pruning


def _patch_engine_core_shutdown(shutdown: Callable) -> Callable:
    from vllm.logger import init_logger

    logger = init_logger("vllm.probe_pruning")

    def shutdown_saving_probe_pruning_history(self):
        from vllm_pp.pruning import save_probe_pruning_history

        config = ProbePruningConfig.from_additional_config(self.vllm_config.additional_config)
        executor = getattr(self, "model_executor", None)
        if (
            config.enabled
            and config.history.path
            and executor is not None
            and not getattr(executor, "is_failed", False)
            and not getattr(self, _HISTORY_SAVED, False)
        ):
            setattr(self, _HISTORY_SAVED, True)
            try:
                # Before the executor goes: Ray actors are killed, not asked to exit.
                paths = executor.collective_rpc(save_probe_pruning_history, timeout=120)
                logger.info("Probe pruning history saved: %s", ", ".join(map(str, paths)))
            except Exception:  # a failed save must not keep the engine from stopping
                logger.exception("Probe pruning history could not be saved")
        return shutdown(self)

    return shutdown_saving_probe_pruning_history


_HISTORY_SAVED = "_probe_pruning_history_saved"

# Ray on vLLM's CPU platform (patches/0003): each worker's placement-group
# bundle reserves one Ray CPU, the resource every Ray node has.
RAY_CPU_RESOURCE = "CPU"


def _ray_needs_cpu_support() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and current_platform.ray_device_key in ("", RAY_CPU_RESOURCE)


def _patch_executor_get_class(get_class: Callable) -> Callable:
    def get_class_with_ray_on_cpu(vllm_config):
        executor_class = get_class(vllm_config)
        if not (getattr(executor_class, "uses_ray", False) and _ray_needs_cpu_support()):
            return executor_class  # CUDA and friends: Ray works upstream
        from vllm_pp.ray_on_cpu import CpuRayExecutorV2

        if executor_class.__name__ != "RayExecutorV2":
            raise ValueError(
                f"Ray on CPU supports vLLM's Ray executor V2, not {executor_class.__name__}: "
                "unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND"
            )
        return CpuRayExecutorV2

    return get_class_with_ray_on_cpu


def install_ray_on_cpu() -> None:
    """Called by ``CpuRayExecutorV2`` in the engine-core process before Ray starts.

    Gives the CPU platform a Ray resource key (read by vLLM's placement-group
    code) and makes the executor spawn ``CpuRayWorkerProc`` actors, which it
    looks up in its own module.
    """
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_executor_v2

    from vllm_pp.ray_on_cpu import CpuRayWorkerProc

    type(current_platform).ray_device_key = RAY_CPU_RESOURCE
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc


def install_runtime_patches() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import init_logger
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor

    logger = init_logger("vllm.probe_pruning")
    for name, make in (
        ("add_cli_args", _patch_add_cli_args),
        ("from_cli_args", _patch_from_cli_args),
        ("create_engine_config", _patch_create_engine_config),
    ):
        if not _wrap_once(EngineArgs, name, make):
            logger.warning(
                "vllm-pp: EngineArgs.%s not found in this vLLM; the --pp-* flags are "
                "unavailable, use --additional-config '{\"probe_pruning\": {...}}'.",
                name,
            )
    if not _wrap_once(EngineCore, "shutdown", _patch_engine_core_shutdown):
        logger.warning("vllm-pp: EngineCore.shutdown not found; --pp-history will not be saved.")
    if not _wrap_once(Executor, "get_class", _patch_executor_get_class):
        logger.warning("vllm-pp: Executor.get_class not found; Ray on CPU is unavailable.")
