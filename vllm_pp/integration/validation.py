"""Start-up checks of a probe-pruning set-up against the engine config vLLM built.

:func:`validate_engine_config` runs in the process that builds vLLM's config
(``EngineArgs.create_engine_config``, wrapped in :mod:`vllm_pp.integration.runtime_patches`),
before any engine process starts: a set-up the plugin cannot honour costs
seconds and ends in one line naming the value and what is allowed, instead of a
worker traceback or, worse, a server that silently serves the model unpruned.
Each worker repeats :func:`check_supported` when it builds its model, for
configs made without ``EngineArgs``.
"""

from __future__ import annotations

from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.integration.registration import (
    ARCHITECTURES,
    BUILTIN_OVERRIDES,
    OVERRIDE_ENV,
    overrides_builtin,
)
from vllm_pp.methods import method_class, pruning_enabled
from vllm_pp.storage.calibration import KIND as CALIBRATION
from vllm_pp.storage.history_shards import check_history_directory
from vllm_pp.storage.statistics import ShardOwner, load_statistics, model_identity

# No tensor is named "rank-1": load_statistics then runs every header check
# (kind, format version, model, TP size) and opens the file, but reads no
# tensor data (a calibration file of a 7B model holds gigabytes).
_HEADER_ONLY_RANK = -1


def validate_engine_config(config: ProbePruningConfig, vllm_config) -> None:
    """Raise :class:`ProbePruningConfigError` for a set-up pruning cannot serve."""
    if not pruning_enabled(config):
        return
    check_architecture(vllm_config)
    check_supported(config, vllm_config)
    check_heads_per_rank(config, vllm_config)
    check_method_and_calibration(config, vllm_config)


def supported_architectures() -> list[str]:
    """Architectures served by the plugin's classes in this process's set-up."""
    names = list(ARCHITECTURES)
    if overrides_builtin():
        names += list(BUILTIN_OVERRIDES)
    return names


def check_architecture(vllm_config) -> None:
    """Only the plugin's model classes prune; any other class would run unpruned."""
    model_config = vllm_config.model_config
    architecture = model_config.architecture  # the one vLLM resolved, after --hf-overrides
    supported = supported_architectures()
    if architecture not in supported and not _is_pruning_model(architecture, model_config):
        hint = "serve this model with ratio 0"
        if architecture in BUILTIN_OVERRIDES:
            ours = BUILTIN_OVERRIDES[architecture].rpartition(":")[2]
            hint = (f"{OVERRIDE_ENV}=0 leaves it to vLLM; select ours with "
                    f"--hf-overrides '{{\"architectures\": [\"{ours}\"]}}' or use ratio 0")
        raise ProbePruningConfigError(
            f"probe pruning does not support architecture {architecture!r}: expected one of "
            f"{', '.join(supported)}, or a subclass of their classes; {hint}"
        )
    window = model_config.get_sliding_window()
    if window is not None:
        # The pruned path is verified against full causal attention only
        # (tests/reference_model.py).
        raise ProbePruningConfigError(
            f"probe pruning does not support sliding-window attention (sliding_window={window}): "
            "pass --disable-sliding-window (caps max_model_len at the window) or use ratio 0"
        )


def _is_pruning_model(architecture: str, model_config) -> bool:
    """Whether a name the plugin does not register maps to a subclass of its models
    (``--model-class-overrides``, another plugin)."""
    if architecture in BUILTIN_OVERRIDES:
        # The override is off (supported_architectures): the workers register
        # vLLM's class under this name, whatever this process registered.
        return False
    from vllm import ModelRegistry

    model_class, _ = ModelRegistry.resolve_model_cls([architecture], model_config)
    return getattr(model_class, "supports_probe_pruning", False)


def check_supported(config: ProbePruningConfig, vllm_config) -> None:
    """Refuse set-ups whose weights or execution the pruned path cannot handle."""
    from vllm.config import CompilationMode, CUDAGraphMode

    num_layers = vllm_config.model_config.hf_config.num_hidden_layers
    if any(i >= num_layers for i in config.skip_layers):
        raise ProbePruningConfigError(
            f"probe_pruning.skip_layers={list(config.skip_layers)} is invalid: the model "
            f"has {num_layers} decoder layers (0..{num_layers - 1})"
        )
    if len(config.skip_layers) == num_layers and not method_class(config.method).keeps_everything:
        raise ProbePruningConfigError(
            f"probe_pruning.skip_layers={list(config.skip_layers)} is invalid: it skips all "
            f"{num_layers} decoder layers, so nothing would be pruned; leave at least one out"
        )
    if vllm_config.quant_config is not None:
        raise ProbePruningConfigError(
            f"probe pruning needs unquantized weights; this model is quantized "
            f"({vllm_config.model_config.quantization}): serve it with ratio 0"
        )
    if vllm_config.lora_config is not None:
        raise ProbePruningConfigError(
            "probe pruning does not support LoRA adapters: drop --enable-lora or use ratio 0"
        )
    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
        raise ProbePruningConfigError(
            "probe pruning needs eager execution: pass enforce_eager=True (--enforce-eager)"
        )


def check_heads_per_rank(config: ProbePruningConfig, vllm_config) -> None:
    """Every rank keeps at least one attention head of its shard (num_kept_heads).

    A rank holding a single head can therefore never prune attention, whatever
    the ratio. (vLLM itself refuses a TP size that does not divide the heads, so
    no rank ever holds zero.)
    """
    if method_class(config.method).keeps_everything:
        return
    heads = vllm_config.model_config.hf_text_config.num_attention_heads
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    if heads // tp_size <= 1:
        raise ProbePruningConfigError(
            f"tensor_parallel_size={tp_size} leaves each rank {heads // tp_size} of the model's "
            f"{heads} attention heads, and a rank always keeps at least one, so no head could "
            f"be pruned: use tensor_parallel_size <= {max(1, heads // 2)} or ratio 0"
        )


def check_method_and_calibration(config: ProbePruningConfig, vllm_config) -> None:
    """The method resolves, has what it needs, and its calibration file fits this model and TP size."""
    method_class(config.method).check_config(config)
    if config.history.path:
        # On this host; with Ray across hosts each node's directory is checked
        # only when its rank first saves.
        check_history_directory(config.history.path)
    if config.calibration is None:
        return
    owner = ShardOwner(
        model_identity(vllm_config.model_config.hf_config),
        vllm_config.parallel_config.tensor_parallel_size,
        _HEADER_ONLY_RANK,
    )
    load_statistics(config.calibration, kind=CALIBRATION, owner=owner)
