"""Calibration: record the dense model's statistics, and read them back.

``CalibrationRecorder`` is the method ``vllm-pp calibrate`` runs the model
with: it keeps every unit (so the output is the dense model's) and records, per
block, the moments of the output projection's input at every position. The
file keeps what PP, FLAP and Wanda-sp need:

* ``sq_mean`` [positions, width]: E[x^2] per position (PP's initial history);
* ``count`` [positions]: tokens seen per position;
* ``mean`` [width]: E[x] over all tokens (FLAP's bias compensation);
* ``variance_sum`` [width]: per-position variances summed over positions
  (FLAP's fluctuation, as the official code computes it).
"""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_pp.algorithm.history import CalibrationMoments
from vllm_pp.methods.base import PrunableBlock, PruningMethod, WorkerInfo
from vllm_pp.statistics import load_statistics, tensor_name

class CalibrationRecorder(PruningMethod):
    """Keeps everything; records moments. method_options: {"max_positions": int}."""

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
        """This rank's statistics under their file names."""
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


class Calibration:
    """One rank's calibration statistics, by block."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: dict):
        self.tensors = tensors
        self.metadata = metadata

    def get(self, block: PrunableBlock, stat: str) -> torch.Tensor:
        return self.tensors[f"layers.{block.layer_index}.{block.kind}.{stat}"]

    def bucketed_sq_mean(self, block: PrunableBlock, bucket_size: int, num_buckets: int) -> torch.Tensor:
        """E[x^2] per history bucket: [num_buckets, width].

        Positions are pooled into buckets weighted by their token counts. Buckets
        beyond the calibrated positions get the all-position mean.
        """
        sq_mean, count = self.get(block, "sq_mean").double(), self.get(block, "count").double()
        positions = torch.arange(sq_mean.shape[0])
        buckets = torch.div(positions, bucket_size, rounding_mode="floor").clamp(max=num_buckets - 1)
        weighted = torch.zeros(num_buckets, sq_mean.shape[1], dtype=torch.float64)
        weighted.index_add_(0, buckets, sq_mean * count[:, None])
        totals = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, buckets, count)
        overall = (sq_mean * count[:, None]).sum(0) / count.sum().clamp(min=1)
        rows = weighted / totals.clamp(min=1)[:, None]
        rows[totals == 0] = overall
        return rows.float()


def load_calibration(path: str, worker: WorkerInfo, blocks: list[PrunableBlock]) -> Calibration:
    tensors, metadata = load_statistics(
        path,
        kind="calibration",
        identity=worker.model_identity,
        tp_size=worker.tp_size,
        rank=worker.tp_rank,
    )
    calibration = Calibration(tensors, metadata)
    missing = [
        f"layer {b.layer_index} {b.kind}"
        for b in blocks
        if f"layers.{b.layer_index}.{b.kind}.sq_mean" not in tensors
    ]
    if missing:
        from vllm_pp.config import ProbePruningConfigError

        raise ProbePruningConfigError(
            f"calibration file {path!r} has no statistics for {', '.join(missing[:3])}"
            + (" ..." if len(missing) > 3 else "")
        )
    return calibration
