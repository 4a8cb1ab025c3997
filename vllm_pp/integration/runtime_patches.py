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
  config vLLM built (validation.py) before any process starts, and, in
  the process that builds the config (the API server), prepares the workers'
  metrics snapshot directory and the collector that puts
  ``vllm:probe_pruning_*`` on ``/metrics`` (vllm_pp/observability/server.py).
* ``EngineCore._initialize_kv_caches`` (0005): at the end of start-up, has
  every worker load the newest ``--pp-history`` round that all of them hold.
* ``EngineCore.post_step`` (0005): starts a history checkpoint round on every
  worker when ``history.checkpoint_seconds`` have passed.
* ``EngineCore.shutdown`` (0004): writes a last round on every worker before
  the executor stops them.
* ``Executor.get_class`` (0003): on vLLM's CPU platform, runs the Ray backend
  with ray_on_cpu.py's executor, since vLLM refuses Ray there.
The flags themselves are defined and parsed in cli_flags.py.
Each wrap is applied once per process, and only if the wrapped attribute exists
(otherwise a warning is logged and ``--additional-config`` still works).
"""

from __future__ import annotations

import functools
from typing import Callable

from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.integration.cli_flags import add_probe_pruning_arguments, fold_cli_flags

_WRAPPED = "__probe_pruning_wrapped__"


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
        from vllm_pp.integration.validation import validate_engine_config
        from vllm_pp.methods import pruning_enabled
        from vllm_pp.observability.server import prepare_server_metrics

        usage_context = kwargs.get("usage_context", args[0] if args else None)
        try:
            config = ProbePruningConfig.from_additional_config(self.additional_config)
            enabled = pruning_enabled(config)
            if enabled and not self.enforce_eager:
                logger.info(
                    "Probe pruning (ratio %.2f) sets enforce_eager=True: per-step pruning "
                    "decisions cannot run inside torch.compile or CUDA graphs.",
                    config.ratio,
                )
                self.enforce_eager = True
            if enabled and config.history.path and not self.shutdown_timeout:
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
            if enabled:
                prepare_server_metrics()
        except ProbePruningConfigError as err:
            command = commands.get(getattr(usage_context, "value", usage_context))
            if command is None:
                raise
            # SystemExit prints its message on stderr and exits with status 1.
            raise SystemExit(f"{command}: error: {err}") from None
        return vllm_config

    return create_engine_config_with_probe_pruning


# The engine core's CheckpointSchedule, when --pp-history is on.
_CHECKPOINTS = "_probe_pruning_checkpoints"


def _history_config(engine_core) -> ProbePruningConfig | None:
    """The config when this engine core keeps a --pp-history, else None."""
    from vllm_pp.methods import pruning_enabled

    config = ProbePruningConfig.from_additional_config(engine_core.vllm_config.additional_config)
    return config if config.history.path and pruning_enabled(config) else None


def _patch_engine_core_initialize_kv_caches(initialize_kv_caches: Callable) -> Callable:
    from vllm.logger import init_logger

    logger = init_logger("vllm.probe_pruning")

    # The last step of the engine core's start-up that reaches the workers (after
    # weights, warm-up and KV cache): the loaded history is what the first request
    # sees. Not __init__ itself: a spawned engine core loads this plugin inside it.
    def initialize_kv_caches_loading_probe_pruning_history(self, *args, **kwargs):
        kv_cache_config = initialize_kv_caches(self, *args, **kwargs)
        config = _history_config(self)
        if config is None:
            return kv_cache_config
        try:
            load_newest_common_round(self, config)
        except BaseException:
            # vLLM's EngineCore.__init__ leaves its executor running when start-up
            # fails; an engine core in the caller's process (no multiprocessing)
            # would keep its workers, e.g. Ray actors, until the interpreter exits.
            self.model_executor.shutdown()
            raise
        return kv_cache_config

    def load_newest_common_round(engine_core, config: ProbePruningConfig) -> None:
        from vllm_pp.integration.models.base import (
            load_probe_pruning_history,
            probe_pruning_history_rounds,
        )
        from vllm_pp.runtime.history_checkpoints import CheckpointSchedule
        from vllm_pp.storage.history_shards import common_round

        held = engine_core.collective_rpc(probe_pruning_history_rounds)  # one list per rank
        round_index = common_round(held)
        if any(rounds and rounds[-1] != round_index for rounds in held):
            by_rank = dict(enumerate(held))
            logger.warning(
                "Probe pruning history: ranks hold rounds %s (a round was cut short); %s",
                by_rank,
                f"every rank loads round {round_index}, the newest all of them hold"
                if round_index is not None
                else "none is held by every rank, so every rank starts from calibration",
            )
        engine_core.collective_rpc(load_probe_pruning_history, args=(round_index,))
        newest = max((r for rounds in held for r in rounds), default=0)
        interval = config.history.checkpoint_seconds if config.history.update else 0
        setattr(engine_core, _CHECKPOINTS, CheckpointSchedule(interval, next_round=newest + 1))

    return initialize_kv_caches_loading_probe_pruning_history


def _patch_engine_core_post_step(post_step: Callable) -> Callable:
    from vllm.logger import init_logger

    logger = init_logger("vllm.probe_pruning")

    def post_step_with_history_checkpoints(self, model_executed: bool) -> None:
        post_step(self, model_executed)
        schedule = getattr(self, _CHECKPOINTS, None)
        round_index = None if schedule is None else schedule.after_step(model_executed)
        if round_index is None:
            return
        from vllm_pp.integration.models.base import checkpoint_probe_pruning_history

        try:  # each rank copies its history to host memory and writes it in the background
            self.collective_rpc(checkpoint_probe_pruning_history, args=(round_index,))
        except Exception:  # a checkpoint must never stop serving
            logger.exception("Probe pruning history round %d could not be started", round_index)

    return post_step_with_history_checkpoints


def _patch_engine_core_shutdown(shutdown: Callable) -> Callable:
    from vllm.logger import init_logger

    logger = init_logger("vllm.probe_pruning")

    def shutdown_saving_probe_pruning_history(self):
        from vllm_pp.integration.models.base import checkpoint_probe_pruning_history

        schedule = getattr(self, _CHECKPOINTS, None)
        executor = getattr(self, "model_executor", None)
        config = _history_config(self) if schedule is not None else None
        if (
            config is not None
            and config.history.update
            and executor is not None
            and not getattr(executor, "is_failed", False)
        ):
            setattr(self, _CHECKPOINTS, None)  # once, though vLLM may call shutdown twice
            round_index = schedule.start_round()
            try:
                # Before the executor goes: Ray actors are killed, not asked to exit.
                executor.collective_rpc(
                    checkpoint_probe_pruning_history, timeout=120, args=(round_index, True)
                )
                logger.info("Probe pruning history saved: round %d in %s", round_index, config.history.path)
            except Exception:  # a failed save must not keep the engine from stopping
                logger.exception("Probe pruning history could not be saved")
        return shutdown(self)

    return shutdown_saving_probe_pruning_history


def _patch_executor_get_class(get_class: Callable) -> Callable:
    def get_class_with_ray_on_cpu(vllm_config):
        from vllm_pp.integration.vllm_compat import ray_needs_cpu_support

        executor_class = get_class(vllm_config)
        if not (getattr(executor_class, "uses_ray", False) and ray_needs_cpu_support()):
            return executor_class  # CUDA and friends: Ray works upstream
        from vllm_pp.integration.ray_on_cpu import CpuRayExecutorV2

        if executor_class.__name__ != "RayExecutorV2":
            raise ValueError(
                f"Ray on CPU supports vLLM's Ray executor V2, not {executor_class.__name__}: "
                "unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND"
            )
        return CpuRayExecutorV2

    return get_class_with_ray_on_cpu


def install_runtime_patches() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import init_logger
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor

    logger = init_logger("vllm.probe_pruning")
    flags_lost = "the --pp-* flags are unavailable, use --additional-config '{\"probe_pruning\": {...}}'"
    history_lost = "--pp-history is neither loaded nor saved"
    # (owner, method, its wrap, what is lost without it)
    for owner, name, make, lost in (
        (EngineArgs, "add_cli_args", _patch_add_cli_args, flags_lost),
        (EngineArgs, "from_cli_args", _patch_from_cli_args, flags_lost),
        (EngineArgs, "create_engine_config", _patch_create_engine_config, flags_lost),
        (EngineCore, "_initialize_kv_caches", _patch_engine_core_initialize_kv_caches, history_lost),
        (EngineCore, "post_step", _patch_engine_core_post_step, history_lost),
        (EngineCore, "shutdown", _patch_engine_core_shutdown, history_lost),
        (Executor, "get_class", _patch_executor_get_class, "Ray on CPU is unavailable"),
    ):
        if not _wrap_once(owner, name, make):
            logger.warning("vllm-pp: %s.%s not found in this vLLM; %s.", owner.__name__, name, lost)
