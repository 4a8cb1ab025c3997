"""Independent references of the static baselines, FLAP and Wanda-sp (docs/algorithm.md 5).

Written from docs/algorithm.md 3.3, 3.5 and 5, sharing no code with ``vllm_pp``:
plain loops in float64 over a calibration file (read with safetensors) and the
checkpoint's output projections. Both decide once, from calibration alone, so
the reference is a function of the file and the weights:

* Wanda-sp: channel score ``sum_i |W[i, k]| * ||x_k||``, ``||x_k||^2`` the
  calibration ``sq_mean`` summed over positions; a head scores the sum of its
  channels; each pruned block keeps its top units at the uniform ``r'``.
* FLAP: channel score ``variance_sum_k * ||W[:, k]||^2``; each block's scores
  standardised (mean 0, unbiased std 1), a head the mean of its standardised
  channels; all heads and channels of the pruned layers pooled, attention
  blocks first, each weighted by its per-token cost (a channel ``3 D``, OPT
  ``2 D``; a head ``4 D hd`` under MHA, ``2 D hd`` under GQA, plus ``2 S hd``
  for the calibration length S); the lowest-scoring prefix whose cost reaches
  ``r'`` of the total is pruned; a block keeps what remains (at least one head,
  channels rounded up to ``channel_multiple``), its top units by raw score; the
  bias ``W[:, pruned] @ mean[pruned]`` stands in for its pruned channels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from helpers.reference_model import ReferenceModel
from helpers.reference_probe_pruning import ReferenceProbePruning, Settings, _top, output_weight

Block = tuple[int, str]  # (layer, "attention" | "mlp")


class ReferenceBaselines:
    """Kept units (and FLAP's bias) of every pruned block, from a calibration file."""

    def __init__(self, model: ReferenceModel, settings: Settings, calibration: Path):
        # The probe-pruning reference's layer set, per-layer counts and shapes.
        shapes = ReferenceProbePruning(model, settings, calibration=None)
        self.model, self.settings, self.calibration = model, settings, calibration
        self.heads, self.head_dim, self.group = shapes.heads, shapes.head_dim, shapes.group
        self.kept_count, self.ratio = shapes.kept_count, shapes.layer_ratio
        self.blocks: list[Block] = [(layer, kind) for kind in ("attention", "mlp") for layer in shapes.pruned_layers]

    def _stat(self, block: Block, name: str) -> torch.Tensor:
        layer, kind = block
        with safe_open(str(self.calibration), framework="pt") as f:
            return f.get_tensor(f"layers.{layer}.{kind}.rank0.{name}").double()

    def _per_head(self, channel_scores: torch.Tensor, reduce) -> torch.Tensor:
        return torch.stack([reduce(channel_scores[h * self.head_dim:(h + 1) * self.head_dim])
                            for h in range(self.heads)])

    def wanda_sp(self) -> dict[Block, list[int]]:
        kept = {}
        for block in self.blocks:
            w = output_weight(self.model, *block)
            norm = self._stat(block, "sq_mean").sum(0).sqrt()
            scores = torch.stack([w[:, k].abs().sum() * norm[k] for k in range(w.shape[1])])
            if block[1] == "attention":
                scores = self._per_head(scores, torch.sum)
            kept[block] = _top(scores, self.kept_count[block[1]])
        return kept

    def flap(self) -> tuple[dict[Block, list[int]], dict[Block, torch.Tensor]]:
        """Kept units and bias ``[D]`` of every pruned block."""
        c = self.model.config
        hidden = c["hidden_size"]
        grouped = self.group > 1
        head_cost = (2 if grouped else 4) * hidden * self.head_dim
        head_cost += 2 * self._seq_len() * self.head_dim
        channel_cost = (2 if self.model.is_opt else 3) * hidden
        raw, pool = {}, []  # pool: (standardised score, cost, block) per unit, in pooling order
        for block in self.blocks:
            w = output_weight(self.model, *block)
            scores = self._stat(block, "variance_sum") * (w**2).sum(0)
            standard = (scores - scores.mean()) / scores.std()
            if block[1] == "attention":
                scores, standard = self._per_head(scores, torch.mean), self._per_head(standard, torch.mean)
            raw[block] = scores
            cost = head_cost if block[1] == "attention" else channel_cost
            pool += [(standard[u].item(), cost, block) for u in range(scores.numel())]
        order = sorted(range(len(pool)), key=lambda i: (pool[i][0], i))
        target = self.ratio * sum(cost for _, cost, _ in pool)
        pruned_count = dict.fromkeys(self.blocks, 0)
        removed = 0.0
        for i in order:
            if removed >= target:
                break
            removed += pool[i][1]
            pruned_count[pool[i][2]] += 1
        kept, bias = {}, {}
        for block in self.blocks:
            units = raw[block].numel()
            count = units - pruned_count[block]
            if block[1] == "attention":
                count = max(1, count)
            else:
                multiple = self.settings.channel_multiple
                count = min(units, math.ceil(max(1, count) / multiple) * multiple)
            kept[block] = _top(raw[block], count)
            width = self.head_dim if block[1] == "attention" else 1
            channels = {u * width + j for u in kept[block] for j in range(width)}
            pruned = [k for k in range(units * width) if k not in channels]
            bias[block] = output_weight(self.model, *block)[:, pruned] @ self._stat(block, "mean")[pruned]
        return kept, bias

    def _seq_len(self) -> int:
        """The calibration windows' length, from the file's JSON header entry."""
        with safe_open(str(self.calibration), framework="pt") as f:
            return int(json.loads(f.metadata()["vllm_pp"])["seq_len"])
