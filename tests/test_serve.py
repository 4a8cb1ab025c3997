"""`vllm serve ... --pp-ratio 0.4`, the way users type it.

The pruned server itself is exercised (every endpoint, then under load) by
tests/test_load.py, which owns the one SmolLM2 server of the suite.
"""

import time

import pytest
from helpers.servers import run_vllm


@pytest.mark.parametrize("flag", [["--model"], []], ids=["--model", "positional"])
def test_both_model_forms_carry_the_ratio(flag, random_models):
    import vllm_pp

    vllm_pp.register()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    top = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(top.add_subparsers())
    model = str(random_models["llama-gqa"])
    args = top.parse_args(["serve", *flag, model, "--pp-ratio", "0.4"])
    # As `vllm serve` does: the positional model tag wins over --model.
    args.model = getattr(args, "model_tag", None) or args.model
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.model == model
    assert engine_args.additional_config["probe_pruning"]["ratio"] == 0.4


def test_bad_pp_ratio_fails_fast(default_model):
    """The real command (each start costs ~20 s of imports); more values in test_runtime_patches."""
    started = time.monotonic()
    result = run_vllm(["serve", str(default_model), "--pp-ratio", "abc"])
    assert result.returncode != 0
    message = "probe_pruning.ratio='abc' is invalid: expected a number"
    assert f"argument --pp-ratio: {message}" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 60
