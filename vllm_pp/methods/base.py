"""The interface every pruning method implements.

Lifecycle of a method object (one per model instance, i.e. per worker):

1. ``__init__(config, blocks, worker)``: before weights load. Allocate per-block
   state here (as tensors the method owns) so memory profiling sees it.
2. ``prepare(output_weights)``: once, after weights load. ``output_weights[block]``
   is the block's output projection weight on this rank, ``[hidden, width]``.
   Calibration statistics and saved history are loaded here.
3. ``decide(block, batch, residual, probe)``: every step, for every pruned block.
   Returns the kept units (heads for attention, channels for MLP) as ascending
   local indices, or None to run the block dense.
4. ``update(block, batch, channels, activations)``: right after the block ran
   on the kept weights, with the output projection's input of the kept
   channels (``activations[:, j]`` is channel ``channels[j]``, in any order;
   both stay valid until the block's next step).
5. ``end_step(batch)``: once the model's forward pass is over, for work the
   method defers to the end of the step (PP batches its history updates).

``output_correction(block, kept)`` may add a per-block term to the output
projection's partial sum (FLAP's bias compensation).

A method that learns while serving (PP's history) persists it with
``--pp-history``: ``history_layout()`` (None: nothing to persist),
``load_history(tensors)`` right after ``prepare`` and ``history_tensors()`` at
clean shutdown (see vllm_pp/history_store.py).

The model code calls these and never branches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch

from vllm_pp.config import ProbePruningConfig
from vllm_pp.step import StepBatch

BlockKind = Literal["attention", "mlp"]

# Runs the given tokens (row indices of the step) through the block up to the
# output projection's input: [P] -> [P, width].
ProbeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WorkerInfo:
    """What a method needs to know about the model and this worker."""

    num_layers: int
    tp_rank: int
    tp_size: int
    # Model identity recorded in, and checked against, statistics files.
    model_identity: dict = field(default_factory=dict)
    # Positions a per-position history must cover (vLLM's max_model_len).
    max_model_len: int = 2048


@dataclass(frozen=True)
class PrunableBlock:
    """One attention or MLP block of one decoder layer, on this TP rank."""

    layer_index: int
    kind: BlockKind
    # Input channels of the output projection on this rank
    # (attention: local heads x head_dim; MLP: local intermediate size).
    width: int
    head_dim: int = 1  # channels per prunable unit; 1 for MLP

    @property
    def num_units(self) -> int:
        """Local heads for attention, local channels for MLP."""
        return self.width // self.head_dim


class PruningMethod:
    """Base class: runs every block dense. Subclasses override what they need."""

    def __init__(
        self,
        config: ProbePruningConfig,
        blocks: list[PrunableBlock],
        worker: WorkerInfo,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.worker = worker

    def prepare(self, output_weights: Mapping[PrunableBlock, torch.Tensor]) -> None:
        pass

    def decide(
        self,
        block: PrunableBlock,
        batch: StepBatch,
        residual: torch.Tensor,  # [num_tokens, hidden] residual stream entering the block
        probe: ProbeFn,
    ) -> torch.Tensor | None:
        return None

    def update(
        self,
        block: PrunableBlock,
        batch: StepBatch,
        channels: torch.Tensor,  # [K * head_dim] output projection input channels, any order
        activations: torch.Tensor,  # [num_tokens, K * head_dim], columns as channels
    ) -> None:
        pass

    def end_step(self, batch: StepBatch) -> None:
        pass

    def output_correction(self, block: PrunableBlock, kept: torch.Tensor) -> torch.Tensor | None:
        """A [hidden] term added to this rank's partial output of the block, or None."""
        return None

    def history_layout(self) -> dict | None:
        """What a saved history must match to be loaded; None when there is no history."""
        return None

    def history_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's history under its file names."""
        return {}

    def load_history(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the history with a saved one (names without the rank part)."""
