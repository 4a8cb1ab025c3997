"""Registration of the probe-pruning architectures with vLLM's model registry."""

from __future__ import annotations

import os

# Our own names, always registered: select them explicitly with
# `--hf-overrides '{"architectures": ["ProbePruningLlamaForCausalLM"]}'`.
ARCHITECTURES = {
    "ProbePruningLlamaForCausalLM": "vllm_pp.integration.models.llama:ProbePruningLlamaForCausalLM",
    "ProbePruningOPTForCausalLM": "vllm_pp.integration.models.opt:ProbePruningOPTForCausalLM",
}

# vLLM's built-in names we take over by default, so that `vllm serve MODEL
# --pp-ratio 0.4` works on any LLaMA or OPT checkpoint. With pruning off the
# subclasses are exactly vLLM's classes (same modules, dispatch and forward).
BUILTIN_OVERRIDES = {
    "LlamaForCausalLM": ARCHITECTURES["ProbePruningLlamaForCausalLM"],
    "LLaMAForCausalLM": ARCHITECTURES["ProbePruningLlamaForCausalLM"],
    "OPTForCausalLM": ARCHITECTURES["ProbePruningOPTForCausalLM"],
}

# Set to 0 to leave vLLM's built-in LLaMA/OPT classes alone.
OVERRIDE_ENV = "PROBE_PRUNING_OVERRIDE_BUILTIN"


def overrides_builtin() -> bool:
    value = os.environ.get(OVERRIDE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes"):
        raise ValueError(f"{OVERRIDE_ENV}={value!r} is invalid: expected 0 or 1")
    return value in ("1", "true", "yes")


def register_architectures() -> None:
    # Lazy "module:Class" strings: registering must not import torch models in
    # the API-server process.
    from vllm import ModelRegistry

    names = dict(ARCHITECTURES)
    if overrides_builtin():
        names.update(BUILTIN_OVERRIDES)
    for architecture, target in names.items():
        ModelRegistry.register_model(architecture, target)
