"""vLLM's pruned forward against the independent reference, with injected masks.

The masks come from ``selection_hooks.FixedSelection``: a different pseudo-random
set of heads and channels per layer, block and step, so decoding keeps heads at
later steps that were pruned at earlier ones. The paged KV cache must still
match the reference's full cache.
"""

import json
import math

import pytest
import torch
from helpers.engines import vllm_engine
from helpers.reference_model import ReferenceModel, single_thread
from helpers.schedule_replay import chunks_per_request, decode_mismatch, vllm_generate
from helpers.selection_hooks import fixed_kept_units

SEED, FRACTION, SKIP = 7, 0.5, [0]
PROMPTS = [  # token ids; distinct lengths identify the requests in the schedule log
    [1, 504, 3458, 314, 4649, 314, 253, 1345, 30, 2056, 3325],
    [1, 26049, 282, 3224, 314],
    [1, 504, 1559, 282, 260, 2328, 28, 3132, 1092, 3022, 7373, 30, 378, 1953, 1034, 253],
]
DECODE_STEPS = 8


def _config(schedule_log, attention_heads="auto"):
    return {
        "probe_pruning": {
            "ratio": 0.5,
            "method": "helpers.selection_hooks:FixedSelection",
            "method_options": {"seed": SEED, "fraction": FRACTION, "schedule_log": str(schedule_log)},
            "skip_layers": SKIP,
            "attention_heads": attention_heads,
        }
    }


def _kept_fn(reference: ReferenceModel, tp_size: int):
    config = reference.config
    heads = config["num_attention_heads"]
    width = config.get("intermediate_size") or config["ffn_dim"]

    def kept(layer: int, kind: str, key: int):
        if layer in SKIP:
            return None
        total = heads if kind == "attention" else width
        return fixed_kept_units(SEED, layer, kind, key, total // tp_size, tp_size, FRACTION)

    return kept


def _reference_run(reference: ReferenceModel, tp_size: int, schedule: list[dict]):
    """Prompt logprobs and greedy continuations, replaying vLLM's step schedule."""
    with single_thread():
        return _replay(reference, tp_size, schedule)


def _replay(reference: ReferenceModel, tp_size: int, schedule: list[dict]):
    kept = _kept_fn(reference, tp_size)
    prompt_logprobs, tokens = [], []
    for prompt, chunks in zip(PROMPTS, chunks_per_request(schedule, PROMPTS)):
        cache, sequence, logprobs = reference.new_cache(), list(prompt), []
        for start, length, key in chunks:
            logits = reference.forward(sequence[start:start + length], start, cache, kept, key)
            logprobs.append(torch.log_softmax(logits, -1))
            if start + length >= len(prompt):
                sequence.append(int(logits[-1].argmax()))
        logprobs = torch.cat(logprobs)
        prompt_logprobs.append([logprobs[i, sequence[i + 1]].item() for i in range(len(prompt) - 1)])
        generated = sequence[len(prompt):][:DECODE_STEPS]
        steps = range(len(prompt) - 1, len(prompt) - 1 + len(generated))
        tokens.append((generated, [logprobs[i, sequence[i + 1]].item() for i in steps]))
    return prompt_logprobs, tokens


# attention_heads "auto" (the CPU default) attends on the kept heads at prefill
# steps and on every head at decode steps; "all" on every head at every step.
@pytest.fixture(scope="module", params=[
    ("llama-mha", 1, "auto"), ("llama-gqa", 1, "auto"), ("opt", 1, "auto"), ("llama-gqa", 2, "auto"),
    ("opt", 2, "auto"), ("llama-mha", 2, "auto"), ("llama-gqa", 1, "all"),
], ids=lambda p: f"{p[0]}-tp{p[1]}-{p[2]}")
def pruned_run(request, random_models, tmp_path_factory):
    family, tp_size, attention_heads = request.param
    path = random_models[family]
    schedule_log = tmp_path_factory.mktemp("schedule") / "steps.jsonl"
    with vllm_engine(
        path, tensor_parallel_size=tp_size, in_process=True,
        additional_config=_config(schedule_log, attention_heads),
    ) as llm:
        got = vllm_generate(llm, PROMPTS, DECODE_STEPS)
    schedule = [json.loads(line) for line in schedule_log.read_text().splitlines()]
    assert len({s["key"] for s in schedule}) == len(schedule) >= DECODE_STEPS
    return family, tp_size, got, _reference_run(ReferenceModel(path), tp_size, schedule)


def test_prompt_logprobs_match_reference(pruned_run):
    family, tp_size, (got, _), (want, _) = pruned_run
    for g, w in zip(got, want):
        assert len(g) == len(w)
        assert max(abs(a - b) for a, b in zip(g, w)) < 2e-3, (family, tp_size, g, w)


def test_multi_step_decoding_matches_reference_with_full_kv_cache(pruned_run):
    family, tp_size, (_, got), (_, want) = pruned_run
    assert all(len(ids) == DECODE_STEPS for ids, _ in got)
    assert decode_mismatch(got, want) < 2e-3, (family, tp_size, got, want)


def _class_name(model) -> str:
    return type(model).__name__


def test_kv_cache_test_catches_unwritten_pruned_heads(random_models, tmp_path):
    """The same comparison fails for a model that does not write pruned heads' K/V."""
    path = random_models["llama-mha"]
    schedule_log = tmp_path / "steps.jsonl"
    with vllm_engine(
        path,
        in_process=True,
        additional_config=_config(schedule_log),
        hf_overrides={"architectures": ["SkipPrunedHeadsKV"]},
        model_class_overrides={"SkipPrunedHeadsKV": "helpers.broken_kv_cache:SkipPrunedHeadsKV"},
    ) as llm:
        assert llm.apply_model(_class_name) == ["SkipPrunedHeadsKV"]
        _, got = vllm_generate(llm, PROMPTS, DECODE_STEPS)
    schedule = [json.loads(line) for line in schedule_log.read_text().splitlines()]
    _, want = _reference_run(ReferenceModel(path), 1, schedule)
    assert decode_mismatch(got, want) > 1e-2


def test_masks_really_prune(random_models):
    """Guard against a vacuous comparison: the masks change the reference's output."""
    reference = ReferenceModel(random_models["llama-gqa"])
    prompt = PROMPTS[0]
    dense = reference.forward(prompt, 0, reference.new_cache(), lambda *a: None, 0)
    pruned = reference.forward(prompt, 0, reference.new_cache(), _kept_fn(reference, 1), 0)
    assert not torch.allclose(dense, pruned, atol=1e-3)
    assert math.isfinite(pruned.abs().max().item())
