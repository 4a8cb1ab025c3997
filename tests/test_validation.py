"""Start-up validation (vllm_pp/validation.py): a set-up pruning cannot serve fails
before any engine starts, with one line naming the value and what is allowed.

Covered elsewhere: bad --pp-ratio values (test_runtime_patches.py, test_serve.py),
bad config values (test_config.py), truncated statistics files and files of another
model or TP size at load time (test_offline_tools.py).
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import vllm_pp
from helpers.engines import vllm_engine
from helpers.servers import run_vllm
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.integration.registration import OVERRIDE_ENV
from vllm_pp.storage.statistics import model_identity, save_statistics

PRUNED = {"probe_pruning": {"ratio": 0.4}}


@pytest.fixture(scope="module")
def qwen2_model(default_model):
    from vllm_pp.tools.random_models import build_random_model

    return build_random_model("qwen2", quiet=True)


def _engine_config(model, **kwargs):
    vllm_pp.register()
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), **kwargs).create_engine_config()


def _refused(model, message: str, **kwargs) -> None:
    """Building the engine config fails with ``message``, on one line."""
    with pytest.raises(ProbePruningConfigError) as err:
        _engine_config(model, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cli_start_up_errors_are_one_line(random_models, qwen2_model, tmp_path):
    """The real `vllm serve`: exit status, and one error line on stderr, no traceback."""
    llama = str(random_models["llama-gqa"])
    garbage = tmp_path / "garbage.safetensors"
    # Its first 8 bytes, read as the header length, ask for ~500 PB.
    garbage.write_bytes(bytes(range(256)) * 16)
    cases = [
        # argparse refuses the flag itself.
        ([llama, "--pp-method", "magic"],
         "argument --pp-method: probe_pruning.method='magic' is invalid: expected one of "
         "calibration, dense, flap, full-batch, probe, wanda-sp, or 'package.module:ClassName'"),
        # These pass argparse and fail once vLLM has built its config (other such
        # errors take the same path: test_errors_end_the_cli_in_one_line).
        ([str(qwen2_model), "--pp-ratio", "0.4"],
         "probe pruning does not support architecture 'Qwen2ForCausalLM': expected one of "
         "ProbePruningLlamaForCausalLM, ProbePruningOPTForCausalLM, LlamaForCausalLM"),
        ([llama, "--pp-ratio", "0.4", "--pp-calibration", str(garbage)],
         f"statistics file '{garbage}' is not a readable safetensors file (truncated or corrupted?)"),
    ]
    # Each run spends ~20 s importing vLLM; run them side by side.
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: run_vllm(["serve", *case[0]], timeout=180), cases))
    for (argv, message), result in zip(cases, results):
        assert result.returncode != 0, argv
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"vllm serve: error: {message}" in errors[0], result.stderr[-3000:]


def test_errors_end_the_cli_in_one_line(random_models, tmp_path):
    """vLLM's servers build the config with their usage context: SystemExit and one line there."""
    vllm_pp.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    missing = tmp_path / "missing.safetensors"
    args = EngineArgs(model=str(random_models["llama-gqa"]),
                      additional_config={"probe_pruning": {"ratio": 0.4, "calibration": str(missing)}})
    with pytest.raises(SystemExit) as exit_:
        args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    assert exit_.value.code == f"vllm serve: error: statistics file '{missing}' does not exist"
    # A Python caller (LLM, AsyncLLM) gets the exception instead.
    with pytest.raises(ProbePruningConfigError, match="does not exist"):
        args.create_engine_config(usage_context=UsageContext.LLM_CLASS)


def test_unsupported_architecture_still_serves_unpruned(qwen2_model):
    # Refused with pruning on (through the CLI above), served by vLLM's own Qwen2 with it off.
    from vllm import SamplingParams

    plain = {"probe_pruning": {"ratio": 0.0}}
    with vllm_engine(qwen2_model, in_process=True, additional_config=plain) as llm:
        [out] = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0),
                             use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4


def test_builtin_architecture_without_override_is_refused(random_models, monkeypatch):
    # With the override off the workers build vLLM's own LlamaForCausalLM, which never prunes.
    monkeypatch.setenv(OVERRIDE_ENV, "0")
    model = random_models["llama-gqa"]
    _refused(model, "probe pruning does not support architecture 'LlamaForCausalLM': expected one of "
             "ProbePruningLlamaForCausalLM, ProbePruningOPTForCausalLM, or a subclass of their classes; "
             "PROBE_PRUNING_OVERRIDE_BUILTIN=0 leaves it to vLLM; select ours with --hf-overrides",
             additional_config=PRUNED)
    _engine_config(model, additional_config=PRUNED,
                   hf_overrides={"architectures": ["ProbePruningLlamaForCausalLM"]})


def test_other_names_must_map_to_a_pruning_class(random_models):
    # --model-class-overrides may put any class under any name: a subclass of the
    # plugin's models prunes (tests/helpers/broken_kv_cache.py), vLLM's own class would not.
    model = random_models["llama-mha"]
    for target, pruning in (("helpers.broken_kv_cache:SkipPrunedHeadsKV", True),
                            ("vllm.model_executor.models.llama:LlamaForCausalLM", False)):
        kwargs = dict(hf_overrides={"architectures": ["MyLlama"]}, model_class_overrides={"MyLlama": target},
                      additional_config=PRUNED)
        if pruning:
            _engine_config(model, **kwargs)
        else:
            _refused(model, "probe pruning does not support architecture 'MyLlama'", **kwargs)


def test_sliding_window_is_refused(random_models):
    model = random_models["llama-gqa"]
    _refused(model, "probe pruning does not support sliding-window attention (sliding_window=128): "
             "pass --disable-sliding-window", hf_overrides={"sliding_window": 128}, additional_config=PRUNED)
    config = _engine_config(model, hf_overrides={"sliding_window": 128}, disable_sliding_window=True,
                            additional_config=PRUNED)
    assert config.model_config.max_model_len == 128


def test_rank_with_a_single_head_is_refused(random_models):
    # llama-mha has 4 heads; a rank always keeps at least one (num_kept_heads).
    model = random_models["llama-mha"]
    _refused(model, "tensor_parallel_size=4 leaves each rank 1 of the model's 4 attention heads, and "
             "a rank always keeps at least one, so no head could be pruned: use tensor_parallel_size <= 2",
             tensor_parallel_size=4, additional_config=PRUNED)
    _engine_config(model, tensor_parallel_size=2, additional_config=PRUNED)
    # `dense` keeps every head anyway.
    _engine_config(model, tensor_parallel_size=4,
                   additional_config={"probe_pruning": {"ratio": 0.4, "method": "dense"}})


def test_skipping_every_layer_is_refused(random_models):
    _refused(random_models["opt"], "probe_pruning.skip_layers=[0, 1, 2, 3, 4, 5] is invalid: it skips "
             "all 6 decoder layers, so nothing would be pruned",
             additional_config={"probe_pruning": {"ratio": 0.4, "skip_layers": list(range(6))}})


@pytest.mark.parametrize("quantization", [
    # Declared by the checkpoint (config.json's quantization_config) ...
    {"hf_overrides": {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}},
    # ... or asked for at load time.
    {"quantization": "int8_per_channel_weight_only"},
], ids=["checkpoint-fp8", "online-int8"])
def test_quantized_weights_are_refused(random_models, quantization):
    model = random_models["llama-gqa"]
    config = _engine_config(model, **quantization)
    assert config.quant_config is not None  # vLLM accepts it with pruning off
    _refused(model, "probe pruning needs unquantized weights; this model is quantized (",
             additional_config=PRUNED, **quantization)


def test_lora_is_refused_before_an_engine_starts(random_models):
    vllm_pp.register()
    from vllm import LLM

    with pytest.raises(ProbePruningConfigError) as err:
        LLM(model=str(random_models["llama-gqa"]), enable_lora=True, additional_config=PRUNED)
    assert str(err.value) == "probe pruning does not support LoRA adapters: drop --enable-lora or use ratio 0"


def test_methods_are_resolved_at_start_up(random_models):
    model = random_models["llama-gqa"]
    _refused(model, "probe_pruning.method='no_such_package.methods:Mine' is invalid: cannot import it "
             "(No module named 'no_such_package')",
             additional_config={"probe_pruning": {"ratio": 0.4, "method": "no_such_package.methods:Mine"}})
    _refused(model, "probe_pruning.method='vllm_pp.config:ProbePruningConfig' is invalid: "
             "'ProbePruningConfig' in 'vllm_pp.config' is not a PruningMethod subclass",
             additional_config={"probe_pruning": {"ratio": 0.4,
                                                  "method": "vllm_pp.config:ProbePruningConfig"}})
    _refused(model, "probe_pruning.method='flap' needs a calibration file (--pp-calibration PATH",
             additional_config={"probe_pruning": {"ratio": 0.4, "method": "flap"}})


def test_calibration_of_another_model_or_tp_size_is_refused_at_start_up(random_models, tmp_path):
    """The worker's load checks, run before any engine starts (header only)."""
    from transformers import AutoConfig

    gqa = random_models["llama-gqa"]
    identity = model_identity(AutoConfig.from_pretrained(gqa))
    files = {}
    for name, model, tp_size in (("other-model", {**identity, "num_key_value_heads": 4}, 1),
                                 ("other-tp", identity, 2), ("fits", identity, 1)):
        files[name] = tmp_path / f"{name}.safetensors"
        metadata = {"kind": "calibration", "model": model, "tensor_parallel_size": tp_size}
        save_statistics(files[name], {}, metadata)

    def pruned_with(name):
        return {"probe_pruning": {"ratio": 0.4, "calibration": str(files[name])}}

    _refused(gqa, "was made for another model: num_key_value_heads=4, this model has 2",
             additional_config=pruned_with("other-model"))
    _refused(gqa, "was written with tensor_parallel_size=2, this server runs 1",
             additional_config=pruned_with("other-tp"))
    _engine_config(gqa, additional_config=pruned_with("fits"))


def test_history_and_calibration_paths_are_checked_before_an_engine_starts(random_models, tmp_path):
    gqa = random_models["llama-gqa"]
    regular = tmp_path / "file"
    regular.write_text("x")

    def pruned_with(**settings):
        return {"probe_pruning": {"ratio": 0.4, **settings}}

    _refused(gqa, f"probe_pruning.history.path='{regular}/history' cannot be created: Not a directory",
             additional_config=pruned_with(history={"path": str(regular / "history")}))
    _refused(gqa, f"statistics file '{tmp_path}' is a directory: expected a file written by vllm-pp",
             additional_config=pruned_with(calibration=str(tmp_path)))
    # A directory that can be made is made, and nothing is left in it.
    fresh = tmp_path / "new" / "history"
    _engine_config(gqa, additional_config=pruned_with(history={"path": str(fresh)}))
    assert fresh.is_dir() and list(fresh.iterdir()) == []
