"""Replaying vLLM's logged step schedule in the float64 references.

A test pruning method running inside vLLM logs, per step, the step key
(``batch.index``) and its token segments ``(start position, length)`` in the
step's token order. Which requests share a step depends on when the engine
picked them up, so the references rebuild it from the log: every segment is
assigned to its request, and the request's tokens are fed in the same chunks.
Prompts of distinct lengths make the assignment unambiguous.
"""

from __future__ import annotations

import math

from vllm import SamplingParams
from vllm.inputs import TokensPrompt


def segment_requests(schedule: list[dict], prompts: list[list[int]]) -> list[list[int]]:
    """The request of every segment of every logged step, in the log's order.

    A segment belongs to a request whose next unprocessed position is its start
    (prefills: whose prompt has that length). Requests that tie are in the same
    step, so they get the same key either way.
    """
    next_pos = [0] * len(prompts)
    owners = []
    for step in schedule:
        used = []
        for start, length in step["segments"]:
            r = next(
                r for r in range(len(prompts))
                if r not in used and next_pos[r] == start
                and (start > 0 or length == len(prompts[r]))
            )
            used.append(r)
            next_pos[r] += length
        owners.append(used)
    return owners


def chunks_per_request(schedule: list[dict], prompts: list[list[int]]) -> list[list[tuple[int, int, int]]]:
    """Per request, its chunks ``(start, length, step key)`` in processing order."""
    chunks = [[] for _ in prompts]
    for step, owners in zip(schedule, segment_requests(schedule, prompts)):
        for (start, length), r in zip(step["segments"], owners):
            chunks[r].append((start, length, step["key"]))
    return chunks


def vllm_generate(llm, prompts: list[list[int]], decode_steps: int):
    """Greedy run: (prompt logprobs per request, (token ids, their logprobs) per request)."""
    params = SamplingParams(
        temperature=0, max_tokens=decode_steps, prompt_logprobs=0, logprobs=0, ignore_eos=True
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    prompt_logprobs = [
        [next(lp.logprob for t, lp in d.items() if t == p[i + 1]) for i, d in enumerate(o.prompt_logprobs[1:])]
        for o, p in zip(outputs, prompts)
    ]
    tokens = []
    for o in outputs:
        ids = list(o.outputs[0].token_ids)
        tokens.append((ids, [d[t].logprob for t, d in zip(ids, o.outputs[0].logprobs)]))
    return prompt_logprobs, tokens


def decode_mismatch(got, want) -> float:
    """Largest logprob difference of the greedy tokens; inf when the tokens differ."""
    worst = 0.0
    for (got_ids, got_lp), (want_ids, want_lp) in zip(got, want):
        if got_ids != want_ids:
            return math.inf
        worst = max([worst] + [abs(a - b) for a, b in zip(got_lp, want_lp)])
    return worst
