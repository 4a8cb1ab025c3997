"""Offline runs through vLLM: calibration and the perplexity evaluator.

Both run vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
all requests are queued before the first step, so every step holds exactly
``batch_size`` full windows (with a background engine core the first step
races the request submission and may hold fewer). The batching is therefore
fixed and documented: step i holds windows ``[i*B, (i+1)*B)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ENGINE_SETTINGS = dict(enforce_eager=True, enable_prefix_caching=False, seed=0)


def tokenize_text(model: str, text_path: Path) -> list[int]:
    """Token ids of the whole text, without BOS (the paper's WikiText2 protocol)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return tokenizer(Path(text_path).read_text(), add_special_tokens=False)["input_ids"]


def contiguous_windows(tokens: list[int], seq_len: int, count: int) -> list[list[int]]:
    """The first ``count`` contiguous, non-overlapping windows of ``seq_len`` tokens."""
    available = len(tokens) // seq_len
    if count > available:
        raise ValueError(f"num_windows={count} is too many: the text holds {available} windows of {seq_len}")
    return [tokens[i * seq_len : (i + 1) * seq_len] for i in range(count)]


def random_windows(tokens: list[int], seq_len: int, count: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``seq_len`` tokens at seeded random offsets."""
    if len(tokens) <= seq_len:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(tokens) - seq_len) for _ in range(count)]
    return [tokens[s : s + seq_len] for s in starts]


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def kv_cache_bytes(model: str, num_tokens: int) -> int:
    """KV-cache bytes that hold ``num_tokens`` tokens of ``model`` in float32, twice over.

    An offline run knows how many tokens it keeps: sizing the cache to them
    replaces vLLM's CPU default (92% of the host's memory), so calibration and
    evaluation run next to other work. The factor 2 covers block rounding.
    """
    import json

    config = json.loads((Path(model) / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = config["num_hidden_layers"] * 2 * kv_heads * head_dim * 4  # K and V, 4-byte
    return 2 * num_tokens * per_token


@contextlib.contextmanager
def _engine(model: str, probe_pruning: dict, seq_len: int, batch_size: int, **kwargs):
    """An in-process engine (steps hold exactly the queued windows), shut down on exit."""
    from vllm import LLM

    # vLLM reads these while it builds the engine and its workers.
    settings = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # collective_rpc ships our own export function to TP workers.
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    if kwargs.get("tensor_parallel_size", 1) == 1:
        # The worker is this process: there is no scheduler process to reserve
        # a core for, and vLLM would otherwise cut torch to one thread.
        settings |= {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": str(os.cpu_count())}
    with environ(**settings):
        llm = LLM(
            model=model,
            additional_config={"probe_pruning": probe_pruning},
            max_model_len=seq_len + 1,
            max_num_seqs=batch_size,
            max_num_batched_tokens=batch_size * seq_len,
            kv_cache_memory_bytes=kv_cache_bytes(model, batch_size * (seq_len + 1)),
            **{**ENGINE_SETTINGS, **kwargs},
        )
    try:
        yield llm
    finally:
        # Explicitly: TP workers (processes or Ray actors) must not outlive the run.
        llm.llm_engine.engine_core.shutdown()


def _export_calibration(model) -> dict:
    """Run on every worker: its recorder's statistics (a module-level function,
    because TP workers receive it pickled)."""
    return model.probe_pruning.method.export()


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


def calibrate(
    model: str,
    out: Path,
    *,
    text: Path,
    num_samples: int = 256,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    distributed_executor_backend: str | None = None,
) -> dict[str, Any]:
    """Run the dense model over calibration windows and save every block's statistics."""
    from vllm_pp.statistics import model_identity, save_statistics

    windows = random_windows(tokenize_text(model, text), seq_len, num_samples, seed)
    recorder = {
        "method": "calibration",
        "skip_layers": [],  # record every layer, so any skip list can use the file
        "method_options": {"max_positions": seq_len},
    }
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.monotonic()
    tensors = {}
    with _engine(model, recorder, seq_len, batch_size,
                 tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                 distributed_executor_backend=distributed_executor_backend) as llm:
        # Only the forward passes matter: the recorder sees every block's input.
        llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                     SamplingParams(max_tokens=1, detokenize=False))
        for shard in llm.apply_model(_export_calibration):
            tensors.update(shard)
        hf_config = llm.llm_engine.model_config.hf_config
    metadata = {
        "kind": "calibration",
        "model": model_identity(hf_config),
        "tensor_parallel_size": tensor_parallel_size,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "seed": seed,
        "text": str(text),
    }
    save_statistics(out, tensors, metadata)
    return {**metadata, "seconds": time.monotonic() - started, "out": str(out)}


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
        probe_pruning.setdefault("probe", {})["ratio"] = run.probe_ratio
    started = time.monotonic()
    with _engine(run.model, probe_pruning, run.seq_len, run.batch_size,
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
    with _engine(model, {"ratio": 0.0}, len(prompts[0]) + new_tokens, len(prompts), **engine) as llm:
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
    with _engine(model, probe_pruning, seq_len, len(prompts), **engine) as llm:
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
