"""Wanda-sp (structured Wanda, as defined in the FLAP paper), a static baseline."""

from __future__ import annotations

from vllm_pp.algorithm.scores import wanda_sp_channel_scores, wanda_sp_head_scores
from vllm_pp.algorithm.selection import top_k_indices
from vllm_pp.methods.static import StaticPruningMethod


class WandaSp(StaticPruningMethod):
    """Structured Wanda (FLAP paper's Wanda-sp): uniform ratio, |W| * ||x||."""

    name = "wanda-sp"

    def choose(self, calibration, weights):
        kept = {}
        for block, weight in weights.items():
            # ||x_k||^2: the calibration mean of x_k^2, summed over positions.
            sq_norm = calibration.get(block, "sq_mean").sum(0)
            scores = wanda_sp_channel_scores(weight, sq_norm)
            if block.kind == "attention":
                scores = wanda_sp_head_scores(scores, block.num_units)
            kept[block] = top_k_indices(scores, self.kept_unit_count(block)).to(weight.device)
        return kept
