"""The static baselines: Wanda-sp and FLAP, decided once from calibration.

Both choose their kept heads/channels in ``prepare`` and return the same sets
at every step, so they are the speed ceiling for a given ratio (the execution
layer may cache their sliced weights).
"""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_pp.algorithm.scores import (
    flap_bias_compensation,
    flap_channel_scores,
    flap_head_scores,
    wanda_sp_channel_scores,
    wanda_sp_head_scores,
)
from vllm_pp.algorithm.selection import (
    flap_allocation,
    kept_heads_to_channels,
    layer_ratio,
    top_k_indices,
)
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.methods.base import PrunableBlock, PruningMethod
from vllm_pp.methods.calibration import Calibration, load_calibration
from vllm_pp.methods.probe import kept_unit_count


class StaticPruningMethod(PruningMethod):
    """Kept units fixed at load time from calibration statistics."""

    def prepare(self, output_weights: Mapping[PrunableBlock, torch.Tensor]) -> None:
        if not self.config.calibration:
            raise ProbePruningConfigError(
                f"probe_pruning.method={self.config.method!r} needs a calibration file "
                "(--pp-calibration PATH, written by `vllm-pp calibrate`)"
            )
        calibration = load_calibration(self.config.calibration, self.worker, self.blocks)
        self.kept = self.choose(calibration, output_weights)

    def choose(
        self, calibration: Calibration, weights: Mapping[PrunableBlock, torch.Tensor]
    ) -> dict[PrunableBlock, torch.Tensor]:
        raise NotImplementedError

    def decide(self, block, batch, residual, probe):
        return self.kept[block]


class WandaSp(StaticPruningMethod):
    """Structured Wanda (FLAP paper's Wanda-sp): uniform ratio, |W| * ||x||."""

    def choose(self, calibration, weights):
        ratio = layer_ratio(self.config.ratio, self.worker.num_layers, len(self.config.skip_layers))
        kept = {}
        for block, weight in weights.items():
            # ||x_k||^2: the calibration mean of x_k^2, summed over positions.
            sq_norm = calibration.get(block, "sq_mean").sum(0)
            scores = wanda_sp_channel_scores(weight, sq_norm)
            if block.kind == "attention":
                scores = wanda_sp_head_scores(scores, block.num_units)
            count = kept_unit_count(block, ratio, self.config.channel_multiple)
            kept[block] = top_k_indices(scores, count).to(weight.device)
        return kept


class Flap(StaticPruningMethod):
    """FLAP: fluctuation metric, global adaptive structure, bias compensation."""

    def choose(self, calibration, weights):
        ratio = layer_ratio(self.config.ratio, self.worker.num_layers, len(self.config.skip_layers))
        attention = [b for b in self.blocks if b.kind == "attention"]
        mlp = [b for b in self.blocks if b.kind == "mlp"]
        scores = {
            b: flap_channel_scores(weights[b], calibration.get(b, "variance_sum"))
            for b in self.blocks
        }
        hidden, head_dim = weights[attention[0]].shape[0], attention[0].head_dim
        # Per-token cost of one head and one channel, as FLAP's code counts them:
        # the head's q, k, v, o projections (q, o only under GQA, whose K/V are
        # never pruned) plus the attention core over the calibration length,
        # against the channel's gate, up, down (OPT: fc1, fc2).
        identity = self.worker.model_identity
        grouped = (identity.get("num_key_value_heads") or 0) < identity["num_attention_heads"]
        context = calibration.metadata.get("seq_len", 1024)
        head_cost = (2 if grouped else 4) * hidden * head_dim + 2 * context * head_dim
        channel_cost = (2 if identity["model_type"] == "opt" else 3) * hidden
        kept_heads, kept_channels = flap_allocation(
            [scores[b] for b in attention],
            attention[0].num_units,
            [scores[b] for b in mlp],
            ratio,
            head_cost=head_cost,
            channel_cost=channel_cost,
            channel_multiple=self.config.channel_multiple,
        )
        counts = dict(zip(attention, kept_heads)) | dict(zip(mlp, kept_channels))
        kept, self.corrections = {}, {}
        for block, weight in weights.items():
            unit_scores = scores[block]
            if block.kind == "attention":
                unit_scores = flap_head_scores(unit_scores, block.num_units)
            kept[block] = top_k_indices(unit_scores, counts[block]).to(weight.device)
            channels = kept_heads_to_channels(kept[block], block.head_dim)
            pruned = torch.ones(block.width, dtype=torch.bool, device=weight.device)
            pruned[channels] = False
            mean = calibration.get(block, "mean").to(weight.device)
            self.corrections[block] = flap_bias_compensation(
                weight, mean, pruned.nonzero().squeeze(1)
            ).to(weight.dtype)
        return kept

    def output_correction(self, block, kept):
        return self.corrections[block]
