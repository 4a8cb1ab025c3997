"""Quality cost of reusing PP decisions across decode steps (``reuse_decode_steps``).

Perplexity of the dense model's greedy continuations, teacher-forced through
*decode steps*: a logits processor forces each next token to the dense one,
while vLLM returns the model's own log-probability of it (its raw logprobs,
computed before logits processors). Unlike ``prompt_logprobs`` (a prefill),
every scored token here comes from a decode step, which is where decisions
are reused.

Prompts: 32 windows of 64 tokens of the evaluation text (``--text heldout``:
the held-out text) after the 128 perplexity windows (as ``benchmarks/quality.py
--decode``), 64 forced tokens each, all 32 requests decoding together. ``--prompt-set K`` takes the K-th
next 32 windows instead (labels end in ``-setK``), to see how much the
result depends on the prompts.

    python benchmarks/decode_reuse.py [--reuse 0 3 7 15] [--baselines] [--prompt-set K] [--probe-selection S] [--probe-ratio R] [--[no-]every-decode-token]

Writes benchmarks/results/decode_reuse_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 64


class ForceTokens(AdapterLogitsProcessor):
    """Forces request tokens to ``SamplingParams.extra_args["force_tokens"]``."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        tokens = (params.extra_args or {}).get("force_tokens")
        if tokens is None:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            forced = torch.full_like(logits, float("-inf"))
            forced[tokens[len(output_ids)]] = 0.0
            return forced

        return force


def decode_perplexity(model: str, probe_pruning: dict, prompts, references) -> float:
    """Perplexity of ``references`` given ``prompts``, scored one decode step at a time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_pp.tools.engine import vllm_engine

    with vllm_engine(
        model, in_process=True, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        dtype="float32", enforce_eager=True, enable_prefix_caching=False,
        max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=len(prompts), seed=0,
        logits_processors=[ForceTokens], additional_config={"probe_pruning": probe_pruning},
    ) as llm:
        params = [
            SamplingParams(max_tokens=len(r), temperature=0, ignore_eos=True, detokenize=False,
                           logprobs=0, extra_args={"force_tokens": r})
            for r in references
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    nll, count = 0.0, 0
    for output, reference in zip(outputs, references):
        completion = output.outputs[0]
        assert list(completion.token_ids) == reference, "the forced tokens were not generated"
        for token, logprobs in zip(reference, completion.logprobs):
            nll -= logprobs[token].logprob
            count += 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", type=int, nargs="*", default=[0, 3, 7, 15])
    parser.add_argument("--baselines", action="store_true", help="also dense, FLAP and Wanda-sp")
    parser.add_argument("--prompt-set", type=int, default=0, help="which 32 windows after the perplexity windows")
    parser.add_argument("--probe-selection", choices=["tokens", "strided"],
                        help="PP's probe.selection (default: the config's); the labels end in '-SELECTION'")
    parser.add_argument("--text", choices=["evaluation", "heldout"], default="evaluation",
                        help="the text the prompts come from (labels of 'heldout' end in '-heldout')")
    parser.add_argument("--probe-ratio", type=float, help="probe.ratio (default: the config's); labels end in '-probe-R'")
    parser.add_argument("--every-decode-token", action=argparse.BooleanOptionalAction,
                        help="probe.every_decode_token (default: the config's); labels end in "
                             "'-every-decode' or '-no-every-decode'")
    args = parser.parse_args(argv)

    from throughput import prepare_model  # benchmarks/ is on sys.path when run as a script

    from vllm_pp.tools.engine import environ
    from vllm_pp.tools.evaluate import dense_continuations
    from vllm_pp.tools.text_data import contiguous_windows, prepare_text, tokenize_text

    model, calibration = prepare_model("smollm2")
    tokens = tokenize_text(str(model), getattr(prepare_text(quiet=True), args.text))
    first = 128 * 512 + args.prompt_set * PROMPTS * PROMPT_LEN
    prompts = contiguous_windows(tokens[first:], PROMPT_LEN, PROMPTS)
    with environ(VLLM_CPU_KVCACHE_SPACE="1"):  # vLLM's default claims 92% of the host's memory
        references = dense_continuations(str(model), prompts, NEW_TOKENS, dtype="float32")
    def suffixed(settings: dict, suffix: str) -> dict:
        return {f"{label}-{suffix}": s for label, s in settings.items()}

    settings = {f"pp-0.4-reuse-{n}": {"method": "probe", "reuse_decode_steps": n} for n in args.reuse}
    probe = {}
    if args.probe_selection:
        probe["selection"] = args.probe_selection
        settings = suffixed(settings, args.probe_selection)
    if args.probe_ratio is not None:
        probe["ratio"] = args.probe_ratio
        settings = suffixed(settings, f"probe-{args.probe_ratio:g}")
    if args.every_decode_token is not None:
        probe["every_decode_token"] = args.every_decode_token
        settings = suffixed(settings, "every-decode" if args.every_decode_token else "no-every-decode")
    if probe:
        settings = {label: {**s, "probe": probe} for label, s in settings.items()}
    if args.baselines:
        settings = {"dense": {"method": "dense"}, **settings,
                    "flap-0.4": {"method": "flap"}, "wanda-sp-0.4": {"method": "wanda-sp"}}
    if args.text != "evaluation":
        settings = suffixed(settings, args.text)
    if args.prompt_set:
        settings = suffixed(settings, f"set{args.prompt_set}")
    out = RESULTS / f"decode_reuse_{Path(model).name}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for label, setting in settings.items():
        probe_pruning = {"ratio": 0.4, "calibration": str(calibration), **setting}
        results[label] = {"settings": probe_pruning,
                          "decode_perplexity": decode_perplexity(str(model), probe_pruning, prompts, references)}
        print(f"[decode_reuse] {label}: {results[label]['decode_perplexity']:.3f}", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
