"""A selector with no scoring, to time the pruned-execution path on its own.

Keeps the first units of every block at the configured ratio (the same counts
PP keeps), so the measured cost is the batch view, the weight gathers and the
pruned GEMMs, without probing or scoring. Used by benchmarks/overhead.py as
``--pp-method trivial_selection:FirstUnits`` with benchmarks/ on PYTHONPATH.
"""

import torch

from vllm_pp.methods.base import PruningMethod


class FirstUnits(PruningMethod):
    def __init__(self, config, blocks, worker):
        super().__init__(config, blocks, worker)
        self.kept = {b: torch.arange(self.kept_unit_count(b)) for b in blocks}

    def decide(self, block, batch, residual, probe):
        return self.kept[block].to(residual.device)
