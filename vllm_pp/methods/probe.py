"""Probe Pruning (PP) and its full-batch upper bound, in vLLM's per-step form.

Per step and pruned block (spec sections 1-3, serving departures in
docs/design.md):

1. rank the step's tokens by the L2 norm of the residual entering the block and
   take the top ``probe.ratio`` share as the probe;
2. run the probe through the block up to the output projection's input
   (attention: the exact per-head outputs of those tokens over their real
   context; MLP: act(gate) * up);
3. fuse the probe's squared activations with the history rows of the probe
   tokens' position buckets (importance-scaled fusion);
4. score heads/channels with PPsp and keep the top ones, with the paper's
   per-layer ratio and the kept MLP count rounded to ``channel_multiple``;
5. after the block ran on the kept weights, update the kept channels' history
   by EMA from the full step.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from vllm_pp.algorithm.history import (
    ema_update_,
    fuse_probe_with_history,
    position_buckets,
    probe_only_statistic,
)
from vllm_pp.algorithm.probe import num_probe_tokens, select_probe_tokens, token_importance
from vllm_pp.algorithm.scores import attention_head_scores, channel_weight_norm, mlp_channel_scores
from vllm_pp.algorithm.selection import (
    kept_heads_to_channels,
    layer_ratio,
    num_kept_channels,
    num_kept_heads,
    top_k_indices,
)
from vllm_pp.methods.base import PrunableBlock, PruningMethod, WorkerInfo
from vllm_pp.methods.calibration import load_calibration
from vllm_pp.step import StepBatch


def kept_unit_count(block: PrunableBlock, ratio: float, channel_multiple: int) -> int:
    """Units a block keeps at per-layer ratio ``ratio`` (heads exact, channels rounded up)."""
    if block.kind == "attention":
        return num_kept_heads(block.num_units, ratio)
    return num_kept_channels(block.num_units, ratio, channel_multiple)


class ProbePruningMethod(PruningMethod):
    """PP: probe + calibrated history + PPsp, decided every step."""

    def __init__(self, config, blocks: list[PrunableBlock], worker: WorkerInfo) -> None:
        super().__init__(config, blocks, worker)
        ratio = layer_ratio(config.ratio, worker.num_layers, len(config.skip_layers))
        self.kept_counts = {b: kept_unit_count(b, ratio, config.channel_multiple) for b in blocks}
        # position_bucket_size 0: one history row shared by all positions.
        self.bucket_size = config.history.position_bucket_size or worker.max_model_len
        self.num_buckets = math.ceil(worker.max_model_len / self.bucket_size)
        # history[block]: [num_buckets, width] running E[x^2] of the output
        # projection's input; allocated now so vLLM's memory profile sees it.
        self.history = {
            b: torch.zeros(self.num_buckets, b.width, dtype=torch.float32) for b in blocks
        }
        self.weight_norms: dict[PrunableBlock, torch.Tensor] = {}
        self.skipped_history_rows = 0

    def prepare(self, output_weights: Mapping[PrunableBlock, torch.Tensor]) -> None:
        self.weight_norms = {b: channel_weight_norm(w) for b, w in output_weights.items()}
        if self.config.calibration:
            calibration = load_calibration(self.config.calibration, self.worker, self.blocks)
            for block in self.blocks:
                rows = calibration.bucketed_sq_mean(block, self.bucket_size, self.num_buckets)
                self.history[block].copy_(rows)

    def decide(self, block, batch: StepBatch, residual, probe):
        importance = token_importance(residual[: batch.num_tokens])
        count = num_probe_tokens(batch.num_tokens, self.config.probe.ratio, self.config.probe.min_tokens)
        rows = select_probe_tokens(importance, count)
        probe_sq = probe(rows).float().square()
        history_rows = self.history[block][self._buckets(batch.positions[rows])]
        return self._keep(block, fuse_probe_with_history(probe_sq, history_rows))

    def update(self, block, batch: StepBatch, kept, activations) -> None:
        channels = kept_heads_to_channels(kept, block.head_dim)
        self.skipped_history_rows += ema_update_(
            self.history[block],
            self._buckets(batch.positions),
            activations[: batch.num_tokens].float().square(),
            channels,
            self.config.history.ema_momentum,
        )

    def _buckets(self, positions: torch.Tensor) -> torch.Tensor:
        return position_buckets(positions.long(), self.bucket_size, self.num_buckets)

    def _keep(self, block: PrunableBlock, fused: torch.Tensor) -> torch.Tensor:
        """Top units by PPsp; ``fused``: [width] fused squared-activation statistic."""
        weight_norm = self.weight_norms[block]
        if block.kind == "attention":
            scores = attention_head_scores(fused, weight_norm, block.num_units)
        else:
            scores = mlp_channel_scores(fused, weight_norm)
        return top_k_indices(scores, self.kept_counts[block])


class FullBatchProbing(ProbePruningMethod):
    """The paper's upper bound: every token is the probe, no history."""

    def decide(self, block, batch: StepBatch, residual, probe):
        rows = torch.arange(batch.num_tokens, device=residual.device)
        return self._keep(block, probe_only_statistic(probe(rows).float().square()))

    def update(self, block, batch, kept, activations) -> None:
        pass
