"""Per-worker probe-pruning state: the method, the step, the blocks, the history files.

One :class:`ProbePruning` per model instance (so per worker). The model code
registers each prunable block with its adapter (vllm_pp/runtime/blocks.py) and
gets a :class:`BlockPruner` back; every step it calls :meth:`ProbePruning.begin_step`
with the step's attention metadata, runs its layers (each block through its
pruner) and calls :meth:`ProbePruning.end_step`. Nothing here imports vLLM:
the vLLM model classes (vllm_pp/integration/models/) hand in what they read
from it.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from vllm_pp.config import ProbePruningConfig
from vllm_pp.methods import build_method
from vllm_pp.methods.base import Probe, PrunableBlock, PruningMethod, StepBatch, WorkerInfo
from vllm_pp.observability import profiling
from vllm_pp.observability.worker import PruningStats, Reporter, build_snapshot
from vllm_pp.runtime.attention import AttendEveryHead, ProbeOnlyAttention, StepAttention
from vllm_pp.runtime.history_checkpoints import HistoryWriter
from vllm_pp.runtime.step import StepTracker
from vllm_pp.storage.history_shards import check_history_shard, load_history_shard, saved_rounds, shard_path

# vLLM attaches its log handler to the "vllm" logger tree only.
logger = logging.getLogger("vllm.probe_pruning")


class BlockPruner:
    """One prunable block bound to its adapter and to its model's method and current step."""

    def __init__(self, block: PrunableBlock, adapter, pruning: "ProbePruning"):
        self.block = block
        self.adapter = adapter  # PrunedAttentionOutput or PrunedMLP
        self.pruning = pruning
        self.stats = pruning.stats.add_block(block.layer_index, block.kind, block.num_units)

    def run(self, residual: torch.Tensor, inputs) -> torch.Tensor:
        """The block's output on ``inputs``, dense or on the kept units as the method decides.

        ``residual`` [T, hidden] is the residual stream entering the block (it
        ranks the probe tokens); ``inputs`` is what the adapter reads.
        """
        adapter = self.adapter
        batch = self.pruning.steps.batch
        # No metadata (warm-up, profiling): dense, which is also the memory worst case.
        if batch is None:
            return adapter.dense(inputs)
        method = self.pruning.method
        # Host-side counters only (observability/worker.py): no device synchronisation.
        stats = self.stats
        probe = Probe(stats.counting(functools.partial(adapter.probe, inputs)), adapter.every_row_computed(inputs))
        if residual.is_cpu:  # wall time means compute time only on the CPU
            started = time.perf_counter()
            kept = method.decide(self.block, batch, residual, probe)
            stats.decide_seconds += time.perf_counter() - started
            stats.timed += 1
        else:
            kept = method.decide(self.block, batch, residual, probe)
        if kept is None:
            stats.dense += 1
            return adapter.dense(inputs)
        stats.pruned += 1
        stats.kept += kept.numel()
        output, activations, channels = adapter.pruned(inputs, kept, method.output_correction(self.block, kept))
        method.update(self.block, batch, channels, activations)
        return output


class ProbePruning:
    """Config, step tracker, method, attention and block pruners of one model instance.

    ``labels`` name this worker in its metrics (model_name, engine, rank).
    """

    def __init__(
        self, config: ProbePruningConfig, worker: WorkerInfo, labels: dict, capturable: bool | None = None,
        gathered: bool = False,
    ) -> None:
        self.config = config
        # Whether the step path avoids every device synchronisation (fixed-size
        # operations only); None: on accelerators, not on the CPU (where waiting
        # costs nothing and the data-dependent forms are cheaper).
        self.capturable = capturable
        # Gathered: the pruned GEMMs read the kept rows of the weights in place
        # (Triton kernels) instead of packed copies; capturable either way.
        self.gathered = gathered
        self.worker = worker
        self.steps = StepTracker()
        self.stats = PruningStats(labels=labels, method=config.method)
        self.reporter = Reporter(self, logger)
        self._history_health: tuple[int, dict] | None = None  # (steps, health)
        self.method: PruningMethod | None = None  # built by build()
        self.attention = AttendEveryHead()  # how pruned layers attend; build() may replace it
        self._pruners: list[BlockPruner] = []
        self._writer: HistoryWriter | None = None  # with --pp-history, made by prepare()
        self._loaded_steps = 0  # served steps behind the loaded history round

    def is_pruned(self, layer_index: int) -> bool:
        return layer_index not in self.config.skip_layers

    def add_block(self, block: PrunableBlock, adapter) -> BlockPruner:
        """Register a block; its pruner works once :meth:`build` has run."""
        pruner = BlockPruner(block, adapter, self)
        self._pruners.append(pruner)
        return pruner

    def build(self, attention=None) -> None:
        """Create the method once every block is known (before weights load).

        ``attention``: how the pruned layers attend (``attend(layer, q, k, v,
        batch) -> StepAttention``); every head by default.
        """
        self.method = build_method(self.config, [p.block for p in self._pruners], self.worker)
        if attention is not None:
            self.attention = attention

    def attend(self, attention: torch.nn.Module, q, k, v, *, head_dim: int, scale: float) -> StepAttention:
        """A pruned layer's attention at this step (q, k, v after rotary).

        The KV cache of every head is written now, whatever is pruned: a head
        kept at a later step must find its cache whole.
        """
        batch = self.steps.batch
        step = self.attention.attend(attention, q, k, v, batch)
        if batch is not None and self.config.probe.attention == "probe-only":
            return ProbeOnlyAttention(step, q, k, v, batch, head_dim=head_dim, scale=scale)
        return step

    def prepare(self) -> None:
        """After weights load: pack the blocks' weights, prepare the method.

        A saved history (``--pp-history``) is loaded afterwards, once the engine
        core has chosen the round every rank loads (:meth:`load_history`).
        """
        if self.capturable is None:
            self.capturable = any(not p.adapter.output.weight.is_cpu for p in self._pruners)
        for pruner in self._pruners:
            pruner.adapter.prepare(capturable=self.capturable, gathered=self.gathered)
        self.method.capturable = self.capturable
        self.method.prepare({p.block: p.adapter.output.weight for p in self._pruners})
        if self.method.keeps_history:
            history = self.method.history_tensors().values()
            logger.info(
                "Probe pruning history (rank %d): %d blocks, %.1f MiB, layout %s%s",
                self.worker.tp_rank, len(history), sum(t.nbytes for t in history) / 2**20,
                self.method.history_layout(), "" if self.config.history.update else ", frozen",
            )
        if self.config.history.path:
            self._writer = HistoryWriter(self.config.history.path, self.worker.shard_owner, self._history_layout())

    # --- --pp-history: called on every rank by the engine core (collective_rpc) ---

    def history_rounds(self) -> list[int]:
        """The checkpoint rounds this rank holds in ``--pp-history``; a shard this
        server cannot load (another model, TP size or layout) stops start-up."""
        if self._writer is None:
            return []
        path, owner, layout = self.config.history.path, self.worker.shard_owner, self._history_layout()
        rounds = saved_rounds(path, self.worker.tp_rank)
        for round_index in rounds:
            check_history_shard(path, owner, layout, round_index)
        return rounds

    def load_history(self, round_index: int | None) -> None:
        """Load round ``round_index`` of this rank's history (None: a first start)."""
        path = self.config.history.path
        if round_index is None:
            logger.info("Probe pruning history (rank %d): no saved round in %s, starting "
                        "from calibration", self.worker.tp_rank, path)
            return
        tensors, metadata = load_history_shard(path, self.worker.shard_owner, self._history_layout(), round_index)
        self.method.load_history(tensors)
        self._loaded_steps = metadata["steps"]
        self._writer.status.loaded_round = round_index
        logger.info(
            "Probe pruning history (rank %d): loaded round %d from %s, written %s (%.0f s ago) "
            "after %d served steps",
            self.worker.tp_rank, round_index, shard_path(path, self.worker.tp_rank, round_index),
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(metadata["saved_at"])),
            time.time() - metadata["saved_at"], metadata["steps"],
        )

    def checkpoint_history(self, round_index: int, wait: bool = False) -> None:
        """Write round ``round_index`` of this rank's history; in the background
        unless ``wait`` (the last round, at clean shutdown)."""
        if self._writer is None or not self.config.history.update:
            return  # a frozen history never changes: its saved round stays as it was
        self._writer.write(
            self.method.history_tensors(), round_index, self._loaded_steps + self.stats.steps, wait=wait
        )

    def _history_layout(self) -> dict:
        self.method.check_config(self.config)  # --pp-history needs a method that keeps a history
        return self.method.history_layout()

    def begin_step(self, metadata, positions: torch.Tensor) -> None:
        """Start a forward pass; ``metadata`` is the step's attention metadata (None: dense)."""
        self.steps.begin(metadata, positions)
        if self.steps.batch is not None:
            if self.stats.steps == 0:
                self.reporter.start()  # with the first real step, not in warm-up
            self.stats.begin_step(self.steps.batch.num_tokens)

    def end_step(self) -> None:
        batch: StepBatch | None = self.steps.batch
        if batch is not None:
            self.method.end_step(batch)

    def metrics_snapshot(self) -> dict:
        """This worker's counters and history health (reads device values: not per step)."""
        sections = profiling.snapshot(reset=False) if profiling.ENABLED else None
        # The history only changes in steps: scan it again only after new ones.
        if self._history_health is None or self._history_health[0] != self.stats.steps:
            self._history_health = (self.stats.steps, self.method.history_health())
        checkpoints = self._writer.status.as_dict() if self._writer else None
        return build_snapshot(self.stats, self._history_health[1], sections, checkpoints)
