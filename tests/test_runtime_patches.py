"""One test per runtime hook (see vllm_pp/runtime_patches.py), plus plugin discovery."""


import pytest
import vllm_pp
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.registration import ARCHITECTURES, BUILTIN_OVERRIDES


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
         "--additional-config.other", "1"],
    )
    assert engine_args.additional_config == {
        "other": 1,
        "probe_pruning": {"ratio": 0.4, "skip_layers": [0, 1], "probe": {"ratio": 0.1}},
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
