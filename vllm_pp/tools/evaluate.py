"""``vllm-pp eval ppl`` and decode quality: how much a pruned model keeps of the dense one.

Perplexity follows the paper's protocol (contiguous windows of the evaluation
text, no BOS); decode quality compares a pruned model's greedy continuation
with the dense model's. Both run in-process engines (vllm_pp/tools/engine.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_pp.tools.engine import offline_engine
from vllm_pp.tools.text_data import contiguous_windows, tokenize_text


def _prompt_nll(llm, windows: list[list[int]]) -> tuple[float, int]:
    """Summed negative log-likelihood of every window token after the first, and their count."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params)
    nll, count = 0.0, 0
    for output, window in zip(outputs, windows):
        for token, logprobs in zip(window[1:], output.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            count += 1
    return nll, count



@dataclass
class PerplexityRun:
    """Settings and result of one `vllm-pp eval ppl` run."""

    model: str
    text: str
    method: str
    ratio: float
    seq_len: int
    num_windows: int
    batch_size: int
    calibration: str | None
    probe_ratio: float | None
    tensor_parallel_size: int
    dtype: str
    perplexity: float = math.nan
    num_tokens: int = 0
    seconds: float = math.nan


def evaluate_perplexity(run: PerplexityRun, extra_config: dict | None = None) -> PerplexityRun:
    """Perplexity of ``run.model`` pruned as configured, over contiguous windows."""
    windows = contiguous_windows(tokenize_text(run.model, Path(run.text)), run.seq_len, run.num_windows)
    probe_pruning = {"ratio": run.ratio, "method": run.method, **(extra_config or {})}
    if run.calibration:
        probe_pruning["calibration"] = run.calibration
    if run.probe_ratio is not None:
        probe_pruning["probe"] = {**probe_pruning.get("probe", {}), "ratio": run.probe_ratio}
    started = time.monotonic()
    with offline_engine(run.model, probe_pruning, run.seq_len, run.batch_size,
                 tensor_parallel_size=run.tensor_parallel_size, dtype=run.dtype) as llm:
        nll, count = _prompt_nll(llm, windows)
    run.perplexity, run.num_tokens = math.exp(nll / count), count
    run.seconds = time.monotonic() - started
    return run


def dense_continuations(model: str, prompts: list[list[int]], new_tokens: int, **engine) -> list[list[int]]:
    """The dense model's greedy continuations of ``prompts``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    with offline_engine(model, {"ratio": 0.0}, len(prompts[0]) + new_tokens, len(prompts), **engine) as llm:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


def decode_quality(
    model: str,
    probe_pruning: dict,
    prompts: list[list[int]],
    references: list[list[int]],
    **engine,
) -> dict[str, float]:
    """How much of the dense model's greedy continuation a pruned model reproduces.

    * ``token_match``: share of positions where the pruned model's own greedy
      continuation equals the dense one;
    * ``prefix_match``: mean share of the continuation reproduced before the
      first divergence;
    * ``reference_perplexity``: the pruned model's perplexity of the dense
      continuation (teacher-forced, so divergence does not compound).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    new_tokens = len(references[0])
    seq_len = len(prompts[0]) + new_tokens
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    scored = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    with offline_engine(model, probe_pruning, seq_len, len(prompts), **engine) as llm:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy)
        teacher = llm.generate(
            [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, references)], scored
        )
    matches, prefixes = 0, 0.0
    for output, reference in zip(outputs, references):
        tokens = list(output.outputs[0].token_ids)
        matches += sum(a == b for a, b in zip(tokens, reference))
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), new_tokens)
        prefixes += prefix / new_tokens
    nll = 0.0
    for output, prompt, reference in zip(teacher, prompts, references):
        for i, token in enumerate(reference):
            nll -= output.prompt_logprobs[len(prompt) + i][token].logprob
    count = len(references) * new_tokens
    return {
        "token_match": matches / count,
        "prefix_match": prefixes / len(references),
        "reference_perplexity": math.exp(nll / count),
    }
