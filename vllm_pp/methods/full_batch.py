"""Full-batch probing: the paper's upper bound, every token of the step is the probe."""

from __future__ import annotations

import torch

from vllm_pp.algorithm.history import unfused_statistic
from vllm_pp.methods.base import StepBatch
from vllm_pp.methods.probe import ProbePruningMethod


class FullBatchProbing(ProbePruningMethod):
    """The paper's upper bound: every token is the probe, no history."""

    name = "full-batch"
    keeps_history = False

    def decide(self, block, batch: StepBatch, residual, probe):
        rows = torch.arange(batch.num_tokens, device=residual.device)
        return self._keep(block, unfused_statistic(probe(rows).float().square()))

    def update(self, block, batch, kept, activations) -> None:
        pass

    def history_layout(self) -> None:
        return None
