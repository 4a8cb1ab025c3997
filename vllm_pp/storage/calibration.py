"""Calibration files, read back: what ``vllm-pp calibrate`` recorded, per block.

The file (written by the ``calibration`` method, vllm_pp/methods/calibration.py)
holds per block of every rank:

* ``sq_mean`` [positions, width]: E[x^2] per position (PP's initial history);
* ``count`` [positions]: tokens seen per position;
* ``mean`` [width]: E[x] over all tokens (FLAP's bias compensation);
* ``variance_sum`` [width]: per-position variances summed over positions
  (FLAP's fluctuation, as the official code computes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from vllm_pp.config import ProbePruningConfigError
from vllm_pp.storage.statistics import ShardOwner, load_statistics

KIND = "calibration"


class Calibration:
    """One rank's calibration statistics, by block (anything with ``layer_index`` and ``kind``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: dict):
        self.tensors = tensors
        self.metadata = metadata

    def get(self, block, stat: str) -> torch.Tensor:
        return self.tensors[f"layers.{block.layer_index}.{block.kind}.{stat}"]

    def bucketed_sq_mean(self, block, bucket_size: int, num_buckets: int) -> torch.Tensor:
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


def load_calibration(path: str, owner: ShardOwner, blocks: Iterable) -> Calibration:
    """``owner``'s shard of the calibration file at ``path``; every block in ``blocks`` must be in it."""
    tensors, metadata = load_statistics(path, kind=KIND, owner=owner)
    missing = [
        f"layer {b.layer_index} {b.kind}"
        for b in blocks
        if f"layers.{b.layer_index}.{b.kind}.sq_mean" not in tensors
    ]
    if missing:
        raise ProbePruningConfigError(
            f"calibration file {path!r} has no statistics for {', '.join(missing[:3])}"
            + (" ..." if len(missing) > 3 else "")
        )
    return Calibration(tensors, metadata)
