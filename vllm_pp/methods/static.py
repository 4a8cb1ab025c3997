"""The static baselines' common part: kept units chosen once, from calibration.

A static method (vllm_pp/methods/flap.py, wanda_sp.py) chooses its kept
heads/channels in ``prepare`` and returns the same sets at every step, so it is
the speed ceiling for a given ratio: the packed weights never change.
"""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_pp.methods.base import PrunableBlock, PruningMethod
from vllm_pp.storage.calibration import Calibration, load_calibration


class StaticPruningMethod(PruningMethod):
    """Kept units fixed at load time from calibration statistics."""

    needs_calibration = True

    def prepare(self, output_weights: Mapping[PrunableBlock, torch.Tensor]) -> None:
        self.check_config(self.config)
        calibration = load_calibration(self.config.calibration, self.worker.shard_owner, self.blocks)
        self.kept = self.choose(calibration, output_weights)

    def choose(
        self, calibration: Calibration, weights: Mapping[PrunableBlock, torch.Tensor]
    ) -> dict[PrunableBlock, torch.Tensor]:
        raise NotImplementedError

    def decide(self, block, batch, residual, probe):
        return self.kept[block]
