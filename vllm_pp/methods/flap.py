"""FLAP (An et al., AAAI 2024), a static baseline: fluctuation metric, global
adaptive structure, bias compensation (docs/algorithm.md 5)."""

from __future__ import annotations

import torch

from vllm_pp.algorithm.scores import flap_bias_compensation, flap_channel_scores, flap_head_scores
from vllm_pp.algorithm.selection import (
    flap_allocation,
    flap_unit_costs,
    kept_heads_to_channels,
    top_k_indices,
)
from vllm_pp.methods.static import StaticPruningMethod


class Flap(StaticPruningMethod):
    """FLAP: fluctuation metric, global adaptive structure, bias compensation."""

    name = "flap"

    def choose(self, calibration, weights):
        attention = [b for b in self.blocks if b.kind == "attention"]
        mlp = [b for b in self.blocks if b.kind == "mlp"]
        scores = {
            b: flap_channel_scores(weights[b], calibration.get(b, "variance_sum"))
            for b in self.blocks
        }
        hidden, head_dim = weights[attention[0]].shape[0], attention[0].head_dim
        # Per-token cost of one head and one channel, as FLAP's code counts them
        # (the attention core over the calibration length).
        head_cost, channel_cost = flap_unit_costs(
            self.worker.model_identity, hidden, head_dim, calibration.metadata.get("seq_len", 1024)
        )
        kept_heads, kept_channels = flap_allocation(
            [scores[b] for b in attention],
            attention[0].num_units,
            [scores[b] for b in mlp],
            self.layer_ratio,
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
