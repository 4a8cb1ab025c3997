"""Attention on the kept query heads only, with vLLM's CPU paged-attention kernel.

vLLM's Attention layer writes the KV cache and runs its backend's kernel on
every head. On the CPU backend a pruned layer splits the two: it writes the
step's K/V of every head (a head kept at a later step must find its cache
whole), then calls the backend's paged-attention kernel itself, only where
asked: for the probe tokens as one-token queries over their real context, and
for the whole step on the kept query heads, with a head slice of the KV cache
(docs/design.md, "Attention on the kept heads"). Everything here touches vLLM
internals that are not a public contract; tests/test_attention_heads.py checks
every call against vLLM's own attention.
"""

from __future__ import annotations

import logging

import torch

from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods.base import StepBatch
from vllm_pp.observability.profiling import timed
from vllm_pp.runtime.attention import AllHeadsAttention, AttendEveryHead, StepAttention, kv_head_runs

logger = logging.getLogger("vllm.probe_pruning")


def choose_attention(config: ProbePruningConfig, attention: torch.nn.Module | None, tp_rank: int):
    """The attention of the pruned layers (``attention_heads``), ``attention`` being the first one's."""
    setting = config.attention_heads
    unsupported = kept_head_attention_unsupported(attention) if attention is not None else "no layer"
    if setting == "kept" and unsupported:
        raise ProbePruningConfigError(
            f"probe_pruning.attention_heads='kept' is invalid here: {unsupported}; "
            "expected 'auto' or 'all'"
        )
    kept = setting != "all" and unsupported is None
    logger.info(
        "Probe pruning attention (rank %d): %s", tp_rank,
        f"on the kept heads only ({'every step' if setting == 'kept' else 'steps that prefill'})"
        if kept else f"on every head ({unsupported or 'attention_heads=all'})",
    )
    return AttendKeptHeadsOnCpu(every_step=setting == "kept") if kept else AttendEveryHead()


class AttendKeptHeadsOnCpu:
    """Kept-head attention at steps that prefill (``auto``), or at every step (``kept``).

    A decode token's attention is short and, with GQA, reads every KV head
    anyway; at decode-only steps the probe's own kernel call costs more than
    the pruned heads save (docs/design.md), so ``auto`` attends every head there.
    """

    def __init__(self, every_step: bool):
        self.every_step = every_step
        self.schedules = Schedules()

    def attend(self, attention: torch.nn.Module, q, k, v, batch: StepBatch | None) -> StepAttention:
        kept_heads_only = batch is not None and (self.every_step or not batch.is_decode_only)
        if not kept_heads_only:
            return AllHeadsAttention(attention(q, k, v))
        write_kv_cache(attention, k, v)
        return KeptHeadsAttention(attention, q, k, v, batch, self.schedules)


class KeptHeadsAttention(StepAttention):
    """Attention on vLLM's CPU kernel, run for the probe rows and the kept heads only.

    q: [T, H * hd] after rotary; the KV cache already holds this step's K/V of
    every head (:meth:`AttendKeptHeadsOnCpu.attend` writes it).
    """

    def __init__(self, attention: torch.nn.Module, q, k, v, batch: StepBatch, schedules: "Schedules"):
        self.attention, self.k, self.v = attention, k, v
        self.batch = batch
        self.kernel = CpuPagedAttention(attention)
        self.schedules = schedules
        self.q = q.view(q.shape[0], -1, attention.head_size)  # [T, H, hd]
        self.group_size = attention.num_heads // attention.num_kv_heads  # query heads per KV head
        self._all_heads: torch.Tensor | None = None

    def probe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self._all_heads is None and rows.numel() == self.batch.num_tokens:
            self._all_heads = self._attend_all_heads()  # full-batch probing: the step's own attention
        if self._all_heads is not None:
            return self._all_heads.index_select(0, rows)
        # Each probe token is a one-token query over its request's context
        # (positions 0..its own, all in the cache after this step's write).
        metadata = self.kernel.metadata
        seq_lens = self.batch.token_seq_lens.index_select(0, rows)  # [P]
        block_table = metadata.block_table.index_select(0, self.batch.request_of_token.index_select(0, rows))
        query_start_loc = torch.arange(rows.numel() + 1, dtype=torch.int32, device=rows.device)
        num_heads = self.q.shape[1]
        schedule = self.kernel.schedule(num_heads, self.attention.num_kv_heads, query_start_loc, seq_lens)
        output = self.kernel.run(
            self.q.index_select(0, rows), slice(None), query_start_loc, seq_lens, block_table, schedule
        )
        return output.view(rows.numel(), -1)

    @timed("attention")
    def all_heads(self) -> torch.Tensor:
        if self._all_heads is None:
            self._all_heads = self._attend_all_heads()
        return self._all_heads

    def _attend_all_heads(self) -> torch.Tensor:
        return attend_after_cache_write(self.attention, self.q.view(self.q.shape[0], -1), self.k, self.v)

    @timed("attention")
    def heads(self, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        if self._all_heads is not None:
            return self._all_heads.index_select(1, channels)
        num_tokens = self.batch.num_tokens
        asked = heads.tolist()  # K <= local heads: the bookkeeping stays on the host
        ascending = sorted(asked)
        metadata = self.kernel.metadata
        outputs = []  # [T, n * kv, hd] per run of KV heads, ascending heads
        for first, end, per_kv in kv_head_runs(asked, self.group_size, self.attention.num_kv_heads):
            run = [h for h in ascending if first <= h // self.group_size < end]
            if run[-1] - run[0] + 1 == len(run):  # consecutive heads: a view (the kernel takes strided queries)
                query = self.q[:num_tokens].narrow(1, run[0], len(run))
            else:
                query = self.q[:num_tokens].index_select(1, torch.tensor(run, device=heads.device))
            schedule = self.schedules.get(self.kernel, len(run), end - first)
            outputs.append(self.kernel.run(
                query, slice(first, end), metadata.query_start_loc, metadata.seq_lens,
                metadata.block_table, schedule,
            ))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # [T, K, hd]
        if asked != ascending:  # columns in the asked order (the packed slots' order)
            column = {head: i for i, head in enumerate(ascending)}
            output = output.index_select(1, torch.tensor([column[h] for h in asked], device=heads.device))
        return output.reshape(num_tokens, -1)


class Schedules:
    """The kernel's work partitions for the step's requests, per head count, shared by all layers.

    Every layer of a step attends the same requests, so a partition computed
    for (heads, KV heads) serves every later layer with the same counts.
    """

    def __init__(self) -> None:
        self._metadata = None
        self._by_heads: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, kernel: CpuPagedAttention, num_heads: int, num_kv_heads: int) -> torch.Tensor:
        metadata = kernel.metadata
        if metadata is not self._metadata:  # a new step
            self._metadata, self._by_heads = metadata, {}
        key = (num_heads, num_kv_heads)
        if key not in self._by_heads:
            self._by_heads[key] = kernel.schedule(num_heads, num_kv_heads, metadata.query_start_loc, metadata.seq_lens)
        return self._by_heads[key]


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
