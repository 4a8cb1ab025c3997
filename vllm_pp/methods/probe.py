"""Probe Pruning (PP) in vLLM's per-step form.

Per step and pruned block (docs/algorithm.md 1-3; the serving departures are
measured in docs/design.md):

1. take ``probe.ratio`` of the step's tokens as the probe: evenly spaced over
   the step (``probe.selection`` "strided", the default), or those whose
   residual entering the block has the largest L2 norm ("tokens", the paper's
   ranking); at a decode-only step, a block whose step already computed every
   token's activations (attention on every head) probes every token
   (``probe.every_decode_token``);
2. run the probe through the block up to the output projection's input
   (attention: the exact per-head outputs of those tokens over their real
   context; MLP: act(gate) * up);
3. fuse the probe's squared activations with the history rows of the probe
   tokens' position buckets (importance-scaled fusion);
4. score heads/channels with PPsp and keep the top ones, with the paper's
   per-layer ratio and the kept MLP count rounded to ``channel_multiple``;
5. after the block ran on the kept weights, update the kept channels' history
   by EMA from the full step (deferred to the end of the step and batched over
   blocks, which gives the same history: a block's history is read only by its
   own next decision).

With ``reuse_decode_steps`` N > 0, steps 1-4 are skipped at up to N decode-only
steps that follow a decision and hold the same requests: the block keeps the
decision it made (bounded staleness, docs/design.md). The EMA update runs at
every step either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_pp.algorithm.history import (
    StepRows,
    ema_update_layers_,
    fuse_probe_with_history,
    position_buckets,
    step_rows,
    unfused_statistic,
)
from vllm_pp.algorithm.probe import (
    num_probe_tokens,
    select_probe_requests,
    select_probe_tokens,
    select_strided_tokens,
    token_importance,
)
from vllm_pp.algorithm.scores import attention_head_scores, channel_weight_norm, mlp_channel_scores
from vllm_pp.algorithm.selection import (
    flap_allocation_removing,
    flap_unit_costs,
    num_kept_groups,
    removed_cost_share,
    top_k_head_groups,
    top_k_indices,
)
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.methods.base import Probe, PrunableBlock, PruningMethod, StepBatch, WorkerInfo
from vllm_pp.observability.profiling import timed
from vllm_pp.storage.calibration import load_calibration
from vllm_pp.storage.statistics import tensor_name


# Activations one step's deferred EMA updates may hold before they run.
PENDING_UPDATE_BYTES = 32 * 2**20
# method_options.head_groups, how attention heads are chosen: "query", each query
# head on its own (the paper); "kv", whole KV groups under grouped-query
# attention, so that a decode attention kernel skips every pruned group's cache.
HEAD_GROUPS = ("query", "kv")
# method_options.allocation, how many units each pruned block keeps: "uniform",
# the layer ratio in every block (the paper); "calibrated", per-block budgets
# from the calibration statistics by FLAP's global allocation
# (ProbePruningMethod._calibrated_budgets).
ALLOCATIONS = ("uniform", "calibrated")


@dataclass(frozen=True)
class _StepState:
    """What every block of one step shares: history rows and whether to decide."""

    index: int  # StepBatch.index
    buckets: torch.Tensor  # [T] history row of each token
    rows: StepRows  # the distinct rows, for the EMA update
    reuse: bool  # keep the decisions of the step before
    decided_at: int  # index of the step whose decisions stand


class ProbePruningMethod(PruningMethod):
    """PP: probe + calibrated history + PPsp, decided every step.

    method_options: {"head_groups": "query" (default) | "kv"}; with "kv" an
    attention block keeps whole KV groups of its rank's heads
    (:func:`~vllm_pp.algorithm.selection.top_k_head_groups`, docs/design.md).
    {"allocation": "uniform" (default) | "calibrated"}; with "calibrated" each
    block's kept count comes from the calibration file at prepare()
    (:meth:`_calibrated_budgets`) and the per-step decision chooses within it.
    """

    name = "probe"
    keeps_history = True
    options = ("head_groups", "allocation")

    def __init__(self, config, blocks: list[PrunableBlock], worker: WorkerInfo) -> None:
        super().__init__(config, blocks, worker)
        self.head_groups = config.method_options.get("head_groups", "query")
        self.allocation = config.method_options.get("allocation", "uniform")
        # Units each block keeps before head-group rounding, when not the layer
        # ratio's: filled by prepare() for allocation "calibrated".
        self.unit_budgets: dict[PrunableBlock, int] = {}
        self.kept_counts = {b: self._kept_count(b) for b in blocks}
        # position_bucket_size 0: one history row shared by all positions.
        self.bucket_size = config.history.position_bucket_size or worker.max_model_len
        self.num_buckets = math.ceil(worker.max_model_len / self.bucket_size)
        # history[block]: [num_buckets, width] running E[x^2] of the output
        # projection's input, a view of its kind's [blocks, num_buckets, width]
        # tensor so one step's EMA updates run as one batched update per kind;
        # allocated now so vLLM's memory profile sees it.
        groups: dict[tuple[str, int], list[PrunableBlock]] = {}  # (kind, width) -> blocks
        for block in blocks:
            groups.setdefault((block.kind, block.width), []).append(block)
        self._history_groups = {
            group: torch.zeros(len(members), self.num_buckets, group[1], dtype=torch.float32)
            for group, members in groups.items()
        }
        self._history_slot = {
            block: (group, slot) for group, members in groups.items()
            for slot, block in enumerate(members)
        }
        self.history = {
            b: self._history_groups[group][slot] for b, (group, slot) in self._history_slot.items()
        }
        self._pending = _PendingUpdates()
        self._slot_indices: dict[tuple, torch.Tensor] = {}  # device copies of the update's block slots
        self.weight_norms: dict[PrunableBlock, torch.Tensor] = {}
        # Accumulated on the history's device; read only by skipped_history_rows.
        self._skipped_rows = torch.zeros((), dtype=torch.int64)
        self._step: _StepState | None = None
        self._last_kept: dict[PrunableBlock, torch.Tensor] = {}
        self._decision_requests = 0  # requests of the step whose decisions stand

    @classmethod
    def check_options(cls, config) -> None:
        super().check_options(config)
        head_groups = config.method_options.get("head_groups", "query")
        if head_groups not in HEAD_GROUPS:
            raise ProbePruningConfigError(
                f"probe_pruning.method_options.head_groups={head_groups!r} is invalid: "
                f"expected one of {', '.join(map(repr, HEAD_GROUPS))}"
            )
        allocation = config.method_options.get("allocation", "uniform")
        if allocation not in ALLOCATIONS:
            raise ProbePruningConfigError(
                f"probe_pruning.method_options.allocation={allocation!r} is invalid: "
                f"expected one of {', '.join(map(repr, ALLOCATIONS))}"
            )
        if allocation == "calibrated" and not config.calibration:
            raise ProbePruningConfigError(
                "probe_pruning.method_options.allocation='calibrated' needs a calibration file "
                "(--pp-calibration PATH, written by `vllm-pp calibrate`)"
            )

    def kept_unit_count(self, block: PrunableBlock) -> int:
        """The block's calibrated budget if it has one, else the layer ratio's count."""
        budget = self.unit_budgets.get(block)
        return budget if budget is not None else super().kept_unit_count(block)

    def _kept_count(self, block: PrunableBlock) -> int:
        """Units ``block`` keeps; whole KV groups round to the nearest group (head_groups "kv")."""
        count = self.kept_unit_count(block)
        if block.kind == "attention" and self.head_groups == "kv":
            return num_kept_groups(count, block.group_size) * block.group_size
        return count

    @property
    def skipped_history_rows(self) -> int:
        """History rows left unchanged because their update was not finite."""
        return int(self._skipped_rows.item())

    def prepare(self, output_weights: Mapping[PrunableBlock, torch.Tensor]) -> None:
        self.weight_norms = {b: channel_weight_norm(w) for b, w in output_weights.items()}
        if self.config.calibration:
            calibration = load_calibration(self.config.calibration, self.worker.shard_owner, self.blocks)
            for block in self.blocks:
                rows = calibration.bucketed_sq_mean(block, self.bucket_size, self.num_buckets)
                self.history[block].copy_(rows)
            if self.allocation == "calibrated":
                # Static per block, fixed before the first step: the step path
                # reads only host ints, as with the uniform counts.
                self.unit_budgets = self._calibrated_budgets(calibration, output_weights)
                self.kept_counts = {b: self._kept_count(b) for b in self.blocks}

    def _calibrated_budgets(self, calibration, output_weights) -> dict[PrunableBlock, int]:
        """Kept units per block by FLAP's global allocation, over PPsp calibration scores.

        Units of all pruned blocks are pooled and the lowest-scoring ones pruned
        (:func:`~vllm_pp.algorithm.selection.flap_allocation`, with FLAP's head
        and channel costs, :func:`~vllm_pp.algorithm.selection.flap_unit_costs`)
        until they remove the share of the pruned blocks' head and channel cost
        that the uniform counts remove. That share is below the layer ratio
        (SmolLM2 at ratio 0.4: r' = 0.44, but they prune 3 of 9 heads and 640 of 1536
        channels, 39.0% of the cost); matching it rather than r' keeps the
        variants compute-matched, "ratio" meaning the same compute removed,
        only spread unevenly over blocks and between attention and MLP.

        A unit scores PPsp with the calibration's E[x^2] over all positions as
        the statistic, ``E[x_k^2] * ||W[:, k]^2||_2``: the score the per-step
        decision ranks units by, with the history it starts from, so the
        budgets follow the measure that then spends them. FLAP's fluctuation
        (the variance) suits FLAP, whose bias compensation restores a pruned
        channel's mean; PP restores nothing, so a channel with a large mean
        and a small variance still matters to it. FLAP standardises each
        block's scores before pooling them, so a block's budget follows the
        shape of its scores, not their scale.

        Under tensor parallelism every rank allocates over its own shard's
        statistics, so ranks may keep different counts in one layer; the
        output projections are row-parallel (each rank's partial output is
        [hidden] whatever its kept count), so the all-reduce is unchanged.
        """
        attention = [b for b in self.blocks if b.kind == "attention"]
        mlp = [b for b in self.blocks if b.kind == "mlp"]
        scores = {}  # block -> [width] PPsp channel scores
        for block in self.blocks:
            # One bucket over every position: the count-weighted E[x^2], [width].
            sq_mean = calibration.bucketed_sq_mean(block, 1, 1)[0]
            scores[block] = mlp_channel_scores(sq_mean, self.weight_norms[block].cpu())
        hidden = next(iter(output_weights.values())).shape[0]
        head_cost, channel_cost = flap_unit_costs(
            self.worker.model_identity, hidden, attention[0].head_dim if attention else 1,
            calibration.metadata.get("seq_len", 1024),
        )
        num_heads = attention[0].num_units if attention else 1
        uniform_count = super().kept_unit_count  # the layer ratio's count
        uniform = removed_cost_share(
            [uniform_count(b) for b in attention], num_heads,
            [uniform_count(b) for b in mlp], [b.num_units for b in mlp],
            head_cost, channel_cost,
        )
        kept_heads, kept_channels = flap_allocation_removing(
            [scores[b] for b in attention],
            num_heads,
            [scores[b] for b in mlp],
            uniform,
            head_cost=head_cost,
            channel_cost=channel_cost,
            channel_multiple=self.config.channel_multiple,
        )
        return dict(zip(attention, kept_heads)) | dict(zip(mlp, kept_channels))

    def decide(self, block, batch: StepBatch, residual, probe):
        step = self._step_state(batch)
        if step.reuse:
            return self._last_kept[block]
        probe_sq, rows = self._probe(batch, residual, probe)
        fused = self._fuse(block, probe_sq, step.buckets.index_select(0, rows))
        kept = self._keep(block, fused)
        self._last_kept[block] = kept
        return kept

    def update(self, block, batch: StepBatch, channels, activations) -> None:
        if not self.config.history.update:
            return  # a frozen history (history.update false)
        # Deferred to end_step: a block's history is read only by its own next
        # decision, so updating all blocks at once changes no result.
        self._pending.add(self._history_slot[block], channels, activations[: batch.num_tokens])
        if self._pending.num_bytes > PENDING_UPDATE_BYTES:
            self.end_step(batch)

    @timed("history update")
    def end_step(self, batch: StepBatch) -> None:
        for (group, _), (slots, channels, activations) in self._pending.drain():
            key = (group, tuple(slots))
            if key not in self._slot_indices:  # the same blocks update at every step: made once
                self._slot_indices[key] = torch.tensor(slots, device=channels.device)
            self._skipped_rows += ema_update_layers_(
                self._history_groups[group],
                self._slot_indices[key],
                self._step_state(batch).rows,
                activations.square_(),
                channels,
                self.config.history.ema_momentum,
            )

    def _step_state(self, batch: StepBatch) -> _StepState:
        """The state shared by this step's blocks, built by the first block that asks."""
        if self._step is None or self._step.index != batch.index:
            self._step = self._new_step_state(batch, self._step)
        return self._step

    def _new_step_state(self, batch: StepBatch, previous: _StepState | None) -> _StepState:
        buckets = self._buckets(batch.positions[: batch.num_tokens])
        # Consecutive decode-only steps with as many requests hold the same
        # requests: a new request prefills first, a finished one lowers the count.
        # The rule reads only the batch structure, so every TP rank agrees.
        reuse = (
            previous is not None
            and previous.index == batch.index - 1
            and batch.is_decode_only
            and batch.num_requests == self._decision_requests
            and batch.index - previous.decided_at <= self.config.reuse_decode_steps
        )
        if not reuse:
            self._decision_requests = batch.num_requests
        decided_at = previous.decided_at if reuse else batch.index
        # Capturable: every history row, in fixed-size operations; otherwise (the
        # CPU, where waiting costs nothing) only the step's rows.
        rows = step_rows(buckets, self.num_buckets if self.capturable else None)
        return _StepState(batch.index, buckets, rows, reuse, decided_at)

    @timed("probe")
    def _probe(self, batch: StepBatch, residual, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared probe activations [P, width] and the probe's rows [P] in the step
        (every token at a decode-only step whose block computed them all, with
        ``probe.every_decode_token``)."""
        probe_config = self.config.probe
        count = num_probe_tokens(batch.num_tokens, probe_config.ratio, probe_config.min_tokens)
        if probe_config.every_decode_token and batch.is_decode_only and probe.every_row_computed:
            rows = torch.arange(batch.num_tokens, device=residual.device)
        elif probe_config.selection == "strided":
            rows = select_strided_tokens(batch.num_tokens, count, residual.device)
        elif probe_config.selection == "requests":
            rows = select_probe_requests(
                token_importance(residual[: batch.num_tokens]), batch.query_start_loc,
                probe_config.request_ratio, probe_config.request_token_ratio,
            )
        else:
            rows = select_probe_tokens(token_importance(residual[: batch.num_tokens]), count)
        return probe(rows).float().square(), rows

    @timed("scoring")
    def _fuse(self, block: PrunableBlock, probe_sq: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """The fused statistic [width] of the probe ([P, width]) and its tokens' history rows."""
        fusion = self.config.history.fusion
        if fusion == "probe-only":
            return unfused_statistic(probe_sq)
        history_rows = self.history[block].index_select(0, buckets)
        if fusion == "history-only":
            return unfused_statistic(history_rows)
        return fuse_probe_with_history(probe_sq, history_rows)

    def _buckets(self, positions: torch.Tensor) -> torch.Tensor:
        return position_buckets(positions.long(), self.bucket_size, self.num_buckets)

    def _keep(self, block: PrunableBlock, fused: torch.Tensor) -> torch.Tensor:
        """Top units by PPsp; ``fused``: [width] fused squared-activation statistic."""
        return self._select(block, self._scores(block, fused))

    @timed("scoring")
    def _scores(self, block: PrunableBlock, fused: torch.Tensor) -> torch.Tensor:
        """PPsp score of every head / channel: [num_units]."""
        weight_norm = self.weight_norms[block]
        if block.kind == "attention":
            return attention_head_scores(fused, weight_norm, block.num_units)
        return mlp_channel_scores(fused, weight_norm)

    @timed("selection")
    def _select(self, block: PrunableBlock, scores: torch.Tensor) -> torch.Tensor:
        if block.kind == "attention" and self.head_groups == "kv":
            return top_k_head_groups(scores, block.group_size, self.kept_counts[block])
        return top_k_indices(scores, self.kept_counts[block])

    def history_layout(self) -> dict:
        return {"position_bucket_size": self.bucket_size, "num_buckets": self.num_buckets}

    def history_tensors(self) -> dict[str, torch.Tensor]:
        rank = self.worker.tp_rank
        return {
            tensor_name(b.layer_index, b.kind, rank, "history"): rows
            for b, rows in self.history.items()
        }

    def load_history(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for block, rows in self.history.items():
            name = f"layers.{block.layer_index}.{block.kind}.history"
            saved = tensors.get(name)
            if saved is None or saved.shape != rows.shape or not torch.isfinite(saved).all():
                found = "missing" if saved is None else f"shape {tuple(saved.shape)}"
                raise ProbePruningConfigError(
                    f"saved history {name} is invalid ({found}, or not finite): "
                    f"expected finite values of shape {tuple(rows.shape)}"
                )
        for block, rows in self.history.items():
            rows.copy_(tensors[f"layers.{block.layer_index}.{block.kind}.history"])

    def history_health(self) -> dict:
        nonfinite = sum(int((~group.isfinite()).sum()) for group in self._history_groups.values())
        return {"nonfinite_values": nonfinite, "skipped_rows": self.skipped_history_rows}


class _PendingUpdates:
    """One step's EMA updates, held until :meth:`ProbePruningMethod.end_step`.

    Entries are grouped by (history group, kept width) so each group stacks
    into one batched update. Holding the activations keeps them alive past
    their block, so their total size is bounded (``PENDING_UPDATE_BYTES``).

    A group stacks into a buffer kept across steps (grown, never shrunk) and
    is squared there: on the CPU a fresh tensor of a prefill step's size (tens
    of MiB) is mapped and page-faulted anew each time (measured in
    docs/design.md, "The history update's stacking buffer").
    """

    def __init__(self) -> None:
        self._groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self.num_bytes = 0
        self._buffer = torch.empty(0, dtype=torch.float32)

    def add(self, slot: tuple[tuple[str, int], int], channels: torch.Tensor, activations: torch.Tensor):
        group, index = slot
        # channels may be the block's live slot map (execution.PackedUnits),
        # which changes only at the block's next step: drain() copies it first.
        self._groups.setdefault((group, channels.numel()), []).append((index, channels, activations))
        self.num_bytes += activations.numel() * activations.element_size()

    def drain(self):
        """Yield ``(key, (slots, channels [N, K], activations [N, T, K]))`` and empty the store.

        The activations are float32 in the reused buffer: the caller may
        overwrite them, and they are valid until it asks for the next group.
        """
        groups, self._groups, self.num_bytes = self._groups, {}, 0
        for key, entries in groups.items():
            slots, channels, activations = zip(*entries)
            yield key, (list(slots), torch.stack(channels), self._stack(activations))

    def _stack(self, activations: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shape = (len(activations), *activations[0].shape)
        size = math.prod(shape)
        if self._buffer.numel() < size or self._buffer.device != activations[0].device:
            self._buffer = torch.empty(size, dtype=torch.float32, device=activations[0].device)
        return torch.stack(activations, out=self._buffer[:size].view(shape))
