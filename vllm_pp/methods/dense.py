"""``dense``: the pruned layers' path with nothing pruned, to measure that path's overhead."""

from __future__ import annotations

from vllm_pp.methods.base import PruningMethod


class Dense(PruningMethod):
    """Decides nothing: every block runs dense through the plugin's layers."""

    name = "dense"
    keeps_everything = True
