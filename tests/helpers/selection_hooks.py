"""Test hooks loaded inside vLLM workers (the tests put this folder on PYTHONPATH).

``FixedSelection`` is a pruning method that ignores activations and keeps a
pseudo-random set of heads/channels chosen from (seed, layer, block, step
index): every step keeps other units, so decoding keeps heads that were pruned
at earlier steps. Which requests a step holds depends on when vLLM's engine
picks requests up, so rank 0 logs every step's key and token segments; the
independent reference (reference_model.py) replays that schedule and recomputes
the same sets with :func:`fixed_kept_units`.
"""

from __future__ import annotations

import json
import math

import torch

from vllm_pp.methods.base import Probe, PruningMethod
from vllm_pp.methods.full_batch import FullBatchProbing
from vllm_pp.methods.probe import ProbePruningMethod


def fixed_kept_units(
    seed: int, layer: int, kind: str, key: int, num_local: int, tp_size: int, fraction: float
) -> torch.Tensor:
    """Global indices of the kept units: each rank keeps ``ceil(fraction * num_local)``."""
    keep = max(1, math.ceil(fraction * num_local))
    kept = []
    for rank in range(tp_size):
        code = seed * 1_000_003 + layer * 7919 + (kind == "mlp") * 104_729 + key * 31 + rank
        generator = torch.Generator().manual_seed(code)
        local = torch.randperm(num_local, generator=generator)[:keep].sort().values
        kept.append(local + rank * num_local)
    return torch.cat(kept)


class FixedSelection(PruningMethod):
    """method_options: {"seed": int, "fraction": float, "schedule_log": path}."""

    options = ("seed", "fraction", "schedule_log")

    def decide(self, block, batch, residual, probe):
        options = self.config.method_options
        if self.worker.tp_rank == 0 and block == self.blocks[0]:
            starts = batch.positions[batch.query_start_loc[:-1].long()].tolist()
            with open(options["schedule_log"], "a") as log:
                log.write(json.dumps({"key": batch.index, "segments": list(
                    zip(starts, batch.query_lens.tolist()))}) + "\n")
        kept = fixed_kept_units(
            options["seed"], block.layer_index, block.kind, batch.index,
            block.num_units, self.worker.tp_size, options["fraction"],
        )
        start = self.worker.tp_rank * block.num_units
        mine = kept[(kept >= start) & (kept < start + block.num_units)] - start
        return mine.to(residual.device)


class _DecisionLog:
    """Mixed into a per-step method: logs every decision, method_options {"decision_log": path}.

    Each rank appends one JSON line per (step, layer, block): the step key, its
    segments (as FixedSelection logs them), the probe rows the method asked for
    and the kept units (local indices), for the independent reference
    (reference_probe_pruning.py); rank r > 0 to ``{decision_log}.rank{r}``.
    """

    options = ("decision_log",)

    def decide(self, block, batch, residual, probe):
        probe_rows = []

        def logged_probe(rows):
            probe_rows.extend(rows.tolist())
            return probe(rows)

        kept = super().decide(block, batch, residual, Probe(logged_probe, probe.every_row_computed))
        starts = batch.positions[batch.query_start_loc[:-1].long()].tolist()
        record = {
            "key": batch.index,
            "layer": block.layer_index,
            "kind": block.kind,
            "segments": list(zip(starts, batch.query_lens.tolist())),
            "probe_rows": probe_rows,
            "kept": kept.tolist(),
        }
        path, rank = self.config.method_options["decision_log"], self.worker.tp_rank
        with open(path if rank == 0 else f"{path}.rank{rank}", "a") as log:
            log.write(json.dumps(record) + "\n")
        return kept


class LoggedProbePruning(_DecisionLog, ProbePruningMethod):
    """PP itself, logging every decision."""


class LoggedFullBatchProbing(_DecisionLog, FullBatchProbing):
    """Full-batch probing itself, logging every decision."""
