"""One test per runtime hook (see vllm_pp/integration/runtime_patches.py), plus plugin discovery."""


import pytest
import vllm_pp
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.integration.registration import ARCHITECTURES, BUILTIN_OVERRIDES


@pytest.fixture(scope="module")
def serve_parser():
    vllm_pp.register()
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    top = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(top.add_subparsers())
    return top


@pytest.fixture(scope="module")
def model_dir(random_models):
    return str(random_models["llama-gqa"])


def _engine_args(parser, model_dir, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(["serve", model_dir, *argv])
    args.model = args.model_tag  # as `vllm serve` does before building engine args
    return AsyncEngineArgs.from_cli_args(args)


def test_vllm_discovers_and_runs_the_plugin():
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert plugins["probe_pruning"] is vllm_pp.register
    plugins["probe_pruning"]()
    plugins["probe_pruning"]()  # idempotent


def test_architectures_are_registered():
    vllm_pp.register()
    from vllm import ModelRegistry

    names = set(ModelRegistry.get_supported_archs())
    assert set(ARCHITECTURES) <= names and set(BUILTIN_OVERRIDES) <= names


def test_add_cli_args_hook_adds_probe_pruning_group(serve_parser):
    args = serve_parser.parse_args(["serve", "/models/m", "--pp-ratio", "0.4", "--pp-method", "dense"])
    assert args.probe_pruning_ratio == 0.4 and args.probe_pruning_method == "dense"


def test_from_cli_args_hook_folds_flags_into_additional_config(serve_parser, model_dir):
    engine_args = _engine_args(
        serve_parser,
        model_dir,
        ["--pp-ratio", "0.4", "--pp-skip-layers", "0,1", "--pp-probe-ratio", "0.1",
         "--pp-reuse-decode-steps", "0", "--additional-config.other", "1"],
    )
    assert engine_args.additional_config == {
        "other": 1,
        "probe_pruning": {
            "ratio": 0.4, "skip_layers": [0, 1], "probe": {"ratio": 0.1}, "reuse_decode_steps": 0,
        },
    }


def test_flags_and_additional_config_must_agree(serve_parser, model_dir):
    same = _engine_args(serve_parser, model_dir, ["--pp-ratio", "0.4", "--additional-config.probe_pruning.ratio", "0.4"])
    assert same.additional_config["probe_pruning"]["ratio"] == 0.4
    with pytest.raises(ProbePruningConfigError, match="contradicts"):
        _engine_args(serve_parser, model_dir, ["--pp-ratio", "0.4", "--additional-config.probe_pruning.ratio", "0.2"])


def test_dash_pp_still_means_pipeline_parallel(serve_parser, model_dir):
    engine_args = _engine_args(serve_parser, model_dir, ["-pp", "1"])
    assert engine_args.pipeline_parallel_size == 1
    assert "probe_pruning" not in (engine_args.additional_config or {})
    engine_args = _engine_args(serve_parser, model_dir, ["--pipeline-parallel-size", "2", "--pp-ratio", "0.3"])
    assert engine_args.pipeline_parallel_size == 2
    assert engine_args.additional_config["probe_pruning"]["ratio"] == 0.3


@pytest.mark.parametrize("value", ["1.5", "abc", "nan", "-1", "1", "-0.1"])
def test_bad_ratio_is_an_argparse_error(serve_parser, value, capsys):
    # "--pp-ratio=-0.1": vLLM's own argv preprocessing crashes on "--pp-ratio -0.1".
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["serve", "/models/m", f"--pp-ratio={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert " serve: error: argument --pp-ratio: probe_pruning.ratio=" in err


@pytest.mark.parametrize("value", ["-1", "1.5", "abc"])
def test_bad_reuse_decode_steps_is_an_argparse_error(serve_parser, value, capsys):
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["serve", "/models/m", f"--pp-reuse-decode-steps={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert " serve: error: argument --pp-reuse-decode-steps: probe_pruning.reuse_decode_steps=" in err
    assert value in err and err.endswith("expected an integer >= 0")


def test_create_engine_config_hook_forces_eager(random_models):
    vllm_pp.register()
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    model = str(random_models["llama-gqa"])
    pruned = EngineArgs(model=model, additional_config={"probe_pruning": {"ratio": 0.4}})
    assert pruned.create_engine_config().compilation_config.mode == CompilationMode.NONE
    assert pruned.enforce_eager
    plain = EngineArgs(model=model)
    plain.create_engine_config()
    assert not plain.enforce_eager


def test_create_engine_config_hook_validates(random_models):
    vllm_pp.register()
    from vllm.engine.arg_utils import EngineArgs

    bad = EngineArgs(model=str(random_models["opt"]), additional_config={"probe_pruning": {"ratio": 2}})
    with pytest.raises(ProbePruningConfigError, match=r"probe_pruning.ratio=2.0 is invalid"):
        bad.create_engine_config()


def test_history_flags_are_folded(serve_parser, model_dir):
    engine_args = _engine_args(serve_parser, model_dir, ["--pp-ratio", "0.4", "--pp-history", "/h"])
    assert engine_args.additional_config["probe_pruning"]["history"] == {"path": "/h"}
    engine_args = _engine_args(serve_parser, model_dir, [
        "--pp-ratio", "0.4", "--pp-history", "/h", "--pp-history-checkpoint-seconds", "30",
        "--no-pp-history-update"])
    assert engine_args.additional_config["probe_pruning"]["history"] == {
        "path": "/h", "checkpoint_seconds": 30.0, "update": False}
    engine_args = _engine_args(serve_parser, model_dir, ["--pp-ratio", "0.4", "--pp-history-update"])
    assert engine_args.additional_config["probe_pruning"]["history"] == {"update": True}
    # A contradiction names the flag the user typed.
    with pytest.raises(ProbePruningConfigError) as err:
        _engine_args(serve_parser, model_dir, [
            "--pp-ratio", "0.4", "--pp-history", "/h", "--additional-config.probe_pruning.history.path", "/g"])
    assert str(err.value) == "--pp-history '/h' contradicts --additional-config probe_pruning.history.path='/g'"


@pytest.mark.parametrize("value, message", [
    ("-1", "probe_pruning.history.checkpoint_seconds=-1.0 is invalid: expected a number in [0, inf)"),
    ("abc", "probe_pruning.history.checkpoint_seconds='abc' is invalid: expected a number"),
    ("nan", "probe_pruning.history.checkpoint_seconds='nan' is invalid: expected a number, not NaN"),
])
def test_bad_checkpoint_seconds_is_an_argparse_error(serve_parser, value, message, capsys):
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["serve", "/models/m", f"--pp-history-checkpoint-seconds={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f" serve: error: argument --pp-history-checkpoint-seconds: {message}")


class _RecordingExecutor:
    """Two ranks that hold the given checkpoint rounds."""

    def __init__(self, held=([], [])):
        self.calls = []
        self.held = held

    def collective_rpc(self, method, timeout=None, args=()):
        from vllm_pp.integration.models.base import probe_pruning_history_rounds

        self.calls.append((method.__name__, *args))
        if isinstance(self.held, Exception):
            raise self.held
        return [list(r) for r in self.held] if method is probe_pruning_history_rounds else [None, None]

    def shutdown(self):
        self.calls.append(("shutdown",))


class _EngineCoreStandIn:
    def __init__(self, probe_pruning: dict, held=([], [])):
        from types import SimpleNamespace

        self.vllm_config = SimpleNamespace(additional_config={"probe_pruning": probe_pruning})
        self.model_executor = _RecordingExecutor(held)

    def collective_rpc(self, method, timeout=None, args=()):
        return self.model_executor.collective_rpc(method, timeout, args)


HISTORY = {"ratio": 0.4, "history": {"path": "/h", "checkpoint_seconds": 60}}


def _started(probe_pruning: dict, held=([], [])) -> _EngineCoreStandIn:
    from vllm_pp.integration.runtime_patches import _patch_engine_core_initialize_kv_caches

    core = _EngineCoreStandIn(probe_pruning, held)
    initialize = _patch_engine_core_initialize_kv_caches(lambda core, config: "kv-cache-config")
    assert initialize(core, core.vllm_config) == "kv-cache-config"
    return core


def test_initialize_kv_caches_hook_loads_the_newest_round_every_rank_holds(caplog):
    vllm_pp.register()
    from vllm.v1.engine.core import EngineCore
    from vllm_pp.integration.runtime_patches import _WRAPPED

    assert getattr(EngineCore._initialize_kv_caches, _WRAPPED, False)
    core = _started(HISTORY, held=([4, 5], [4]))  # rank 1 died writing round 5
    assert core.model_executor.calls == [
        ("probe_pruning_history_rounds",), ("load_probe_pruning_history", 4)]
    assert ("ranks hold rounds {0: [4, 5], 1: [4]} (a round was cut short); every rank loads "
            "round 4, the newest all of them hold") in caplog.text
    assert core._probe_pruning_checkpoints.next_round == 6  # never reuses a round's name
    core = _started(HISTORY, held=([5, 6], [2, 3]))
    assert core.model_executor.calls[-1] == ("load_probe_pruning_history", None)
    assert "none is held by every rank, so every rank starts from calibration" in caplog.text
    for quiet in ({"ratio": 0.4}, {"ratio": 0.0, "history": {"path": "/h"}}):
        core = _started(quiet)
        assert core.model_executor.calls == [] and not hasattr(core, "_probe_pruning_checkpoints")


def test_initialize_kv_caches_hook_shuts_the_workers_down_when_a_history_is_refused():
    from vllm_pp.integration.runtime_patches import _patch_engine_core_initialize_kv_caches

    refused = ValueError("rank0.round000004.safetensors was written with tensor_parallel_size=1")
    core = _EngineCoreStandIn(HISTORY, held=refused)
    initialize = _patch_engine_core_initialize_kv_caches(lambda core, config: "kv-cache-config")
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        initialize(core, core.vllm_config)
    # vLLM would leave the executor running: an in-process engine core's Ray
    # actors would outlive the failed start-up.
    assert core.model_executor.calls == [("probe_pruning_history_rounds",), ("shutdown",)]


def test_post_step_hook_starts_a_round_on_every_rank_when_due():
    vllm_pp.register()
    from vllm.v1.engine.core import EngineCore
    from vllm_pp.integration.runtime_patches import _WRAPPED, _patch_engine_core_post_step

    assert getattr(EngineCore.post_step, _WRAPPED, False)
    post_step = _patch_engine_core_post_step(lambda core, model_executed: None)
    core = _started(HISTORY, held=([2], [2]))
    core._probe_pruning_checkpoints._last -= 61  # the interval has passed
    post_step(core, model_executed=False)  # nothing served since start-up: nothing new to save
    post_step(core, model_executed=True)
    post_step(core, model_executed=True)  # the next interval starts
    assert core.model_executor.calls[2:] == [("checkpoint_probe_pruning_history", 3)]
    frozen = _started({"ratio": 0.4, "history": {**HISTORY["history"], "update": False}})
    frozen._probe_pruning_checkpoints._last -= 1e6
    post_step(frozen, model_executed=True)
    assert [c[0] for c in frozen.model_executor.calls] == [
        "probe_pruning_history_rounds", "load_probe_pruning_history"]


def test_engine_core_shutdown_hook_writes_a_last_round_first_and_once():
    vllm_pp.register()
    from vllm.v1.engine.core import EngineCore
    from vllm_pp.integration.runtime_patches import _WRAPPED, _patch_engine_core_shutdown

    assert getattr(EngineCore.shutdown, _WRAPPED, False)
    order = []
    shutdown = _patch_engine_core_shutdown(lambda core: order.append(list(core.model_executor.calls[2:])))
    saving = _started(HISTORY, held=([7], [7]))
    shutdown(saving)
    shutdown(saving)  # vLLM may call shutdown twice
    last = ("checkpoint_probe_pruning_history", 8, True)  # written before returning
    assert order == [[last], [last]]
    for quiet in ({"ratio": 0.4}, {"ratio": 0.4, "history": {"path": "/h", "update": False}}):
        core = _started(quiet)
        calls = list(core.model_executor.calls)
        shutdown(core)
        assert core.model_executor.calls == calls


def test_executor_get_class_hook_runs_ray_on_cpu():
    vllm_pp.register()
    from types import SimpleNamespace

    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm_pp.integration.ray_on_cpu import CpuRayExecutorV2

    def get_class(backend):
        return Executor.get_class(SimpleNamespace(
            parallel_config=SimpleNamespace(distributed_executor_backend=backend)))

    assert get_class("ray") is CpuRayExecutorV2
    assert get_class("mp") is MultiprocExecutor
    assert CpuRayExecutorV2._get_actor_resource_kwargs() == {"num_gpus": 0}
