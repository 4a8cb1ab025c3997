"""Per-model probe-pruning state shared by the LLaMA and OPT model classes."""

from __future__ import annotations

import time
from typing import Callable

import torch
from vllm.logger import init_logger

from vllm_pp import profiling
from vllm_pp.algorithm.probe import probe_only_attention
from vllm_pp.attention import Schedules, StepAttention, attend_every_head, attend_kept_heads
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.history_store import load_history_shard, save_history_shard, shard_path
from vllm_pp.methods import build_method
from vllm_pp.methods.base import PrunableBlock, ProbeFn, PruningMethod, WorkerInfo
from vllm_pp.metrics import PruningStats, Reporter, build_snapshot, history_health
from vllm_pp.statistics import model_identity
from vllm_pp.step import StepBatch, StepTracker
from vllm_pp.vllm_compat import (
    check_vllm_version,
    kept_head_attention_unsupported,
    step_attention_metadata,
)

# vLLM attaches its log handler to the "vllm" logger tree only.
logger = init_logger("vllm.probe_pruning")


class BlockPruner:
    """One prunable block bound to its model's method and current step."""

    def __init__(self, block: PrunableBlock, pruning: "ProbePruning"):
        self.block = block
        self.pruning = pruning
        self.stats = pruning.stats.add_block(block.layer_index, block.kind, block.num_units)

    def run(
        self,
        residual: torch.Tensor,
        probe: ProbeFn,
        dense: Callable[[], torch.Tensor],
        pruned: Callable[
            [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ],
    ) -> torch.Tensor:
        """The block's output: ``dense()`` or ``pruned(kept, correction)``, as the method decides.

        ``residual`` [T, hidden] is the residual stream entering the block;
        ``pruned`` returns (output, output projection's kept input, the input
        channel of each of its columns), which feed the method's update.
        """
        batch = self.pruning.steps.batch
        # No metadata (warm-up, profiling): dense, which is also the memory worst case.
        if batch is None:
            return dense()
        method = self.pruning.method
        # Host-side counters only (metrics.py): no device synchronisation.
        stats = self.stats
        if residual.is_cpu:  # wall time means compute time only on the CPU
            started = time.perf_counter()
            kept = method.decide(self.block, batch, residual, stats.counting(probe))
            stats.decide_seconds += time.perf_counter() - started
            stats.timed += 1
        else:
            kept = method.decide(self.block, batch, residual, stats.counting(probe))
        if kept is None:
            stats.dense += 1
            return dense()
        stats.pruned += 1
        stats.kept += kept.numel()
        output, activations, channels = pruned(kept, method.output_correction(self.block, kept))
        method.update(self.block, batch, channels, activations)
        return output


class ProbePruning:
    """Config, step tracker, method and block pruners of one model instance."""

    def __init__(self, config: ProbePruningConfig, vllm_config) -> None:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        self.config = config
        hf_config = vllm_config.model_config.hf_config
        self.worker = WorkerInfo(
            num_layers=hf_config.num_hidden_layers,
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=get_tensor_model_parallel_world_size(),
            model_identity=model_identity(hf_config),
            max_model_len=vllm_config.model_config.max_model_len,
        )
        self.steps = StepTracker()
        parallel = vllm_config.parallel_config
        self.stats = PruningStats(
            labels={
                "model_name": vllm_config.model_config.served_model_name,
                "engine": str(getattr(parallel, "data_parallel_rank", 0) or 0),
                "rank": str(self.worker.tp_rank),
            },
            method=config.method,
        )
        self.reporter = Reporter(self, logger)
        self._history_health: tuple[int, dict] | None = None  # (steps, health)
        self.method: PruningMethod | None = None
        self._output_linears: dict[PrunableBlock, torch.nn.Module] = {}
        self._attention: torch.nn.Module | None = None  # the first pruned layer's vLLM Attention
        self.kept_head_attention = False  # set by build()
        self._schedules = Schedules()

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ProbePruning | None":
        """The pruning state for this model, or None when pruning is off."""
        config = ProbePruningConfig.from_additional_config(vllm_config.additional_config)
        if not config.enabled:
            return None
        check_vllm_version()
        _check_supported(config, vllm_config)
        return cls(config, vllm_config)

    def is_pruned(self, layer_index: int) -> bool:
        return layer_index not in self.config.skip_layers

    def add_block(
        self, block: PrunableBlock, output_linear: torch.nn.Module, attention: torch.nn.Module
    ) -> BlockPruner:
        """Register a block of the layer whose vLLM Attention is ``attention``.

        The returned pruner works once :meth:`build` has run.
        """
        self._output_linears[block] = output_linear
        self._attention = self._attention or attention
        return BlockPruner(block, self)

    def attend(self, attention: torch.nn.Module, q, k, v) -> StepAttention:
        """A pruned layer's attention at this step (q, k, v after rotary).

        The KV cache of every head is written now; with kept-head attention
        the kernel runs later, on the heads the block asks for.
        """
        batch = self.steps.batch
        if batch is not None and self._attends_kept_heads(batch):
            return attend_kept_heads(attention, q, k, v, batch, self._schedules)
        return attend_every_head(attention, q, k, v)

    def _attends_kept_heads(self, batch: StepBatch) -> bool:
        # "auto": steps that prefill only. A decode token's attention is short
        # and, with GQA, reads every KV head anyway; the probe's own kernel call
        # costs more than the pruned heads save (docs/design.md).
        if not self.kept_head_attention:
            return False
        return self.config.attention_heads == "kept" or not batch.is_decode_only

    def attention_probe(
        self, heads: StepAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        *, num_kv_heads: int, head_dim: int, scale: float,
    ) -> ProbeFn:
        """The attention block's probe: rows of o_proj's input for probe token indices.

        heads: the step's attention (:meth:`attend`); q ``[T, H * hd]``, k and
        v ``[T, KV * hd]`` after rotary (used by ``probe.attention``
        "probe-only" only).
        """
        if self.config.probe.attention == "exact":
            return heads.probe_rows
        batch = self.steps.batch

        def probe_only(rows: torch.Tensor) -> torch.Tensor:
            q_rows, k_rows, v_rows = (t.index_select(0, rows) for t in (q, k, v))
            return probe_only_attention(
                q_rows.view(rows.numel(), -1, head_dim),
                k_rows.view(rows.numel(), num_kv_heads, head_dim),
                v_rows.view(rows.numel(), num_kv_heads, head_dim),
                batch.positions.index_select(0, rows),
                batch.request_of_token.index_select(0, rows),
                scale,
            ).to(q.dtype)

        return probe_only

    def build(self) -> None:
        """Create the method once every block is known (before weights load)."""
        self.method = build_method(
            self.config, list(self._output_linears), self.worker
        )
        self.kept_head_attention = self._choose_attention_heads()

    def _choose_attention_heads(self) -> bool:
        """Whether pruned blocks attend on their kept heads only (``attention_heads``)."""
        setting = self.config.attention_heads
        unsupported = kept_head_attention_unsupported(self._attention) if self._attention else "no layer"
        if setting == "kept" and unsupported:
            raise ProbePruningConfigError(
                f"probe_pruning.attention_heads='kept' is invalid here: {unsupported}; "
                "expected 'auto' or 'all'"
            )
        kept = setting != "all" and unsupported is None
        logger.info(
            "Probe pruning attention (rank %d): %s", self.worker.tp_rank,
            f"on the kept heads only ({'every step' if setting == 'kept' else 'steps that prefill'})"
            if kept else f"on every head ({unsupported or 'attention_heads=all'})",
        )
        return kept

    def prepare(self) -> None:
        """After weights load: hand the method the weights, then load the saved history."""
        self.method.prepare({b: lin.weight for b, lin in self._output_linears.items()})
        layout = self.method.history_layout()
        if layout is not None:
            history = self.method.history_tensors().values()
            logger.info(
                "Probe pruning history (rank %d): %d blocks, %.1f MiB, layout %s",
                self.worker.tp_rank, len(history), sum(t.nbytes for t in history) / 2**20, layout,
            )
        if self.config.history.path:
            saved = load_history_shard(self.config.history.path, self.worker, self._history_layout())
            if saved is not None:
                self.method.load_history(saved)
            logger.info(
                "Probe pruning history (rank %d): %s %s",
                self.worker.tp_rank,
                "loaded from" if saved is not None else "first start, will be saved to",
                shard_path(self.config.history.path, self.worker.tp_rank),
            )

    def save_history(self) -> str | None:
        """Write this rank's history shard (``--pp-history``); its path, or None."""
        if not self.config.history.path:
            return None
        path = save_history_shard(
            self.config.history.path,
            self.worker,
            self.method.history_tensors(),
            self._history_layout(),
        )
        return str(path)

    def _history_layout(self) -> dict:
        layout = self.method.history_layout()
        if layout is None:
            raise ProbePruningConfigError(
                f"probe_pruning.history.path={self.config.history.path!r} is set but method "
                f"{self.config.method!r} keeps no history: drop --pp-history or use method 'probe'"
            )
        return layout

    def begin_step(self, positions: torch.Tensor) -> None:
        self.steps.begin(step_attention_metadata(self._attention.layer_name), positions)
        if self.steps.batch is not None:
            if self.stats.steps == 0:
                self.reporter.start()  # with the first real step, not in warm-up
            self.stats.begin_step(self.steps.batch.num_tokens)

    def end_step(self) -> None:
        if self.steps.batch is not None:
            self.method.end_step(self.steps.batch)

    def metrics_snapshot(self) -> dict:
        """This worker's counters and history health (reads device values: not per step)."""
        sections = profiling.snapshot(reset=False) if profiling.ENABLED else None
        # The history only changes in steps: scan it again only after new ones.
        if self._history_health is None or self._history_health[0] != self.stats.steps:
            self._history_health = (self.stats.steps, history_health(self.method))
        return build_snapshot(self.stats, self._history_health[1], sections)


def _check_supported(config: ProbePruningConfig, vllm_config) -> None:
    """Refuse set-ups whose weights or execution the pruned path cannot handle.

    The same checks already ran at start-up (vllm_pp/validation.py); they are
    repeated here for configs built without ``EngineArgs``.
    """
    from vllm_pp.validation import check_supported

    check_supported(config, vllm_config)


def save_probe_pruning_history(worker) -> str | None:
    """Run on every worker by ``collective_rpc`` when the engine shuts down."""
    pruning = getattr(worker.get_model(), "probe_pruning", None)
    return None if pruning is None else pruning.save_history()


class ProbePruningModelMixin:
    """Step bookkeeping shared by the LLaMA and OPT causal-LM classes.

    The class using it sets ``self.probe_pruning`` (None when pruning is off).
    """

    probe_pruning: ProbePruning | None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.probe_pruning is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.probe_pruning.begin_step(positions)
        hidden_states = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.probe_pruning.end_step()
        return hidden_states

    def process_weights_after_loading(self) -> None:
        # vLLM's loader calls this once, after every layer's own post-load step.
        if self.probe_pruning is not None:
            self.probe_pruning.prepare()
