"""Deterministic random-weight models for tests and benchmarks, saved as HF directories.

No real OPT (and no real 7B-sized model) is available offline, so tests and benchmarks
use models with seeded random weights (transformers' default init, std 0.02). They reuse
the tokenizer of the prepared default model, so the vocabulary is SmolLM2's 49,152
tokens and vLLM's tools (e.g. ``vllm bench latency``) work on them unchanged.

Families:

- ``llama-mha`` / ``llama-gqa``: 6 layers, hidden 256, intermediate 512, head_dim 64,
  4 query heads with 4 / 2 KV heads. Six layers so that with the first three layers
  exempt from pruning, three layers still prune. Saved in float32 (tests compare in fp32).
- ``opt``: 6 layers, hidden 256, ffn 512, 4 heads, pre-LayerNorm. float32.
- ``qwen2``: the ``llama-gqa`` shape as Qwen2 (QKV biases), an architecture the
  plugin does not prune: tests show it is refused with pruning on and served with it off.
- ``llama-7b-width``: LLaMA-7B layer width (hidden 4096, intermediate 11008, 32 heads,
  head_dim 128) with only 4 layers, for per-layer timing. Saved in bfloat16 (~2.4 GB,
  about half of it the untied 49,152-token embedding and head).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from vllm_pp.tools.assets import cache_root, cached_directory, say, transformers_output

# Bump when the build below changes, so existing caches are rebuilt.
BUILD_VERSION = 1

_COMMON = {
    "vocab_size": 49152,  # the SmolLM2 tokenizer copied into every model
    "max_position_embeddings": 2048,
    "bos_token_id": 1,  # <|im_start|>, as in SmolLM2
    "eos_token_id": 2,  # <|im_end|>
    "pad_token_id": 2,
}
_TINY_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "head_dim": 64,  # a head size the CPU attention backend supports
}

# family -> (model_type, config values, dtype saved on disk)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama-mha": ("llama", {**_TINY_LLAMA, "num_key_value_heads": 4}, "float32"),
    "llama-gqa": ("llama", {**_TINY_LLAMA, "num_key_value_heads": 2}, "float32"),
    "opt": (
        "opt",
        {
            "hidden_size": 256,
            "word_embed_proj_dim": 256,  # OPTConfig defaults to 768, which adds projections
            "ffn_dim": 512,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "do_layer_norm_before": True,
        },
        "float32",
    ),
    "qwen2": ("qwen2", {**_TINY_LLAMA, "num_key_value_heads": 2}, "float32"),
    "llama-7b-width": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 4,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 128,
        },
        "bfloat16",
    ),
}


def random_model_config(family: str, **overrides: Any):
    """The transformers config of ``family``, with ``overrides`` applied on top."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    model_type, values, _ = _family(family)
    config_class = {"llama": LlamaConfig, "opt": OPTConfig, "qwen2": Qwen2Config}[model_type]
    return config_class(**{**_COMMON, **values, **overrides})


def build_random_model(family: str, out: Path | None = None, *, seed: int = 0,
                       quiet: bool = False, **overrides: Any) -> Path:
    """Return an HF directory of a seeded random ``family`` model, building it if needed.

    The same family, seed and overrides give the same weights. ``overrides`` are
    config values (e.g. ``num_hidden_layers=2``); they are part of the default directory
    name, and a directory built with other parameters is rebuilt.
    """
    _family(family)  # fail on an unknown family before touching the cache
    extra = {"kind": "random-model", "family": family, "seed": seed,
             "overrides": overrides, "build_version": BUILD_VERSION}
    final = Path(out) if out is not None else _default_dir(family, seed, overrides)
    return cached_directory(final, extra,
                            lambda tmp: _build(tmp, family, seed, overrides, quiet),
                            what="random model", quiet=quiet)


def _family(family: str) -> tuple[str, dict[str, Any], str]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _default_dir(family: str, seed: int, overrides: dict[str, Any]) -> Path:
    name = f"random-{family}-seed{seed}"
    if overrides:
        # Keep differently-configured builds apart instead of rebuilding one dir back and forth.
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:8]}"
    return cache_root() / "models" / name


def _build(out: Path, family: str, seed: int, overrides: dict[str, Any], quiet: bool) -> None:
    # The tokenizer comes from the real model, which must be prepared first (cached).
    from vllm_pp.tools.default_model import prepare_default_model, tokenizer_files

    tokenizer_source = prepare_default_model(quiet=quiet)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    say(f"building random {family} model (seed {seed})", quiet)
    config = random_model_config(family, **overrides)
    dtype = getattr(torch, FAMILIES[family][2])
    torch.manual_seed(seed)
    # Constructing directly in the target dtype keeps llama-7b-width at ~2.4 GB of RAM
    # instead of a 4.8 GB float32 copy.
    with transformers_output(quiet):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(out)
    for path in tokenizer_files(tokenizer_source):
        shutil.copy2(path, out / path.name)
