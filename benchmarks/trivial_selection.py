"""A selector with no scoring, to time the pruned-execution path on its own.

Keeps the first units of every block at the configured ratio (the same counts
PP keeps), so the measured cost is the batch view, the weight gathers and the
pruned GEMMs, without probing or scoring. Used by benchmarks/overhead.py as
``--pp-method trivial_selection:FirstUnits`` with benchmarks/ on PYTHONPATH.
"""

import torch

from vllm_pp.algorithm.selection import layer_ratio
from vllm_pp.methods.base import PruningMethod
from vllm_pp.methods.probe import kept_unit_count


class FirstUnits(PruningMethod):
    def __init__(self, config, blocks, worker):
        super().__init__(config, blocks, worker)
        ratio = layer_ratio(config.ratio, worker.num_layers, len(config.skip_layers))
        self.kept = {b: torch.arange(kept_unit_count(b, ratio, config.channel_multiple)) for b in blocks}

    def decide(self, block, batch, residual, probe):
        return self.kept[block].to(residual.device)
