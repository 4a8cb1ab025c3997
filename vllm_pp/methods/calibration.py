"""Calibration: the method ``vllm-pp calibrate`` runs the model with.

It keeps every unit (so the output is the dense model's) and records, per
block, the moments of the output projection's input at every position; the
file it exports is read back by vllm_pp/storage/calibration.py, which lists
what it holds.
"""

from __future__ import annotations

import torch

from vllm_pp.algorithm.history import CalibrationMoments
from vllm_pp.methods.base import PrunableBlock, PruningMethod, WorkerInfo
from vllm_pp.storage.calibration import KIND
from vllm_pp.storage.statistics import tensor_name


class CalibrationRecorder(PruningMethod):
    """Keeps everything; records moments. method_options: {"max_positions": int}."""

    name = "calibration"
    keeps_everything = True
    active_at_ratio_zero = True
    exports = KIND
    options = ("max_positions",)

    def __init__(self, config, blocks: list[PrunableBlock], worker: WorkerInfo) -> None:
        super().__init__(config, blocks, worker)
        self.max_positions = int(config.method_options.get("max_positions", worker.max_model_len))
        self.moments = {b: CalibrationMoments(self.max_positions, b.width) for b in blocks}

    def decide(self, block, batch, residual, probe):
        return torch.arange(block.num_units, device=residual.device)

    def update(self, block, batch, channels, activations) -> None:
        positions = batch.positions[: batch.num_tokens].long()
        inside = positions < self.max_positions  # longer sequences are not recorded
        # Every channel is kept; put the columns in channel order.
        in_order = activations[: batch.num_tokens].index_select(1, channels.argsort())
        self.moments[block].update(in_order[inside], positions[inside])

    def export(self) -> dict[str, torch.Tensor]:
        rank = self.worker.tp_rank
        tensors = {}
        for block, moments in self.moments.items():
            values = {
                "sq_mean": moments.sq_mean.float(),
                "count": moments.count,
                "mean": moments.merged_over_buckets().mean.float(),
                "variance_sum": moments.variance.sum(0).float(),
            }
            for stat, value in values.items():
                tensors[tensor_name(block.layer_index, block.kind, rank, stat)] = value
        return tensors
