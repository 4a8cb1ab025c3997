"""The interface every pruning method implements, and what a method sees of a step.

Lifecycle of a method object (one per model instance, i.e. per worker):

1. ``__init__(config, blocks, worker)``: before weights load. Allocate per-block
   state here (as tensors the method owns) so memory profiling sees it.
2. ``prepare(output_weights)``: once, after weights load. ``output_weights[block]``
   is the block's output projection weight on this rank, ``[hidden, width]``.
   Calibration statistics are loaded here.
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

A method describes itself with class attributes (its traits, below), so that
configuration, start-up validation, metrics and the offline tools ask the class
instead of branching on its name. A method that learns while serving (PP's
history) persists it with ``--pp-history``: ``history_layout()``,
``load_history(tensors)`` right after ``prepare`` and ``history_tensors()`` at
clean shutdown (vllm_pp/storage/history_shards.py).

Adding a built-in method is adding one module under ``vllm_pp/methods/`` with
a subclass that sets ``name``; an out-of-tree method is named
``package.module:ClassName``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Mapping

import torch

from vllm_pp.algorithm.selection import layer_ratio, num_kept_channels, num_kept_heads
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.storage.statistics import ShardOwner

BlockKind = Literal["attention", "mlp"]

@dataclass(frozen=True)
class Probe:
    """Runs the given tokens (row indices of the step) through the block up to the
    output projection's input: ``probe(rows)``, [P] -> [P, width].

    ``every_row_computed``: the step has already computed that input for every
    token (an attention block whose kernel ran on every head), so a probe of
    every row costs a copy, not a block run.
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    every_row_computed: bool = False

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.run(rows)


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

    @property
    def shard_owner(self) -> ShardOwner:
        """This worker's shard of calibration and history files."""
        return ShardOwner(self.model_identity, self.tp_size, self.tp_rank)


@dataclass(frozen=True)
class PrunableBlock:
    """One attention or MLP block of one decoder layer, on this TP rank."""

    layer_index: int
    kind: BlockKind
    # Input channels of the output projection on this rank
    # (attention: local heads x head_dim; MLP: local intermediate size).
    width: int
    head_dim: int = 1  # channels per prunable unit; 1 for MLP
    # Attention: KV heads on this rank (vLLM's num_kv_heads; replicated when the
    # TP size exceeds the model's KV heads). 0: one per query head (MHA), and MLP.
    num_kv_heads: int = 0

    @property
    def num_units(self) -> int:
        """Local heads for attention, local channels for MLP."""
        return self.width // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head on this rank (1 under MHA and for MLP)."""
        return self.num_units // self.num_kv_heads if self.num_kv_heads else 1


@dataclass(frozen=True)
class StepBatch:
    """What the scheduler put into one forward pass, as seen by one worker.

    vLLM flattens a step into ``num_tokens`` tokens: request r owns tokens
    ``query_start_loc[r]:query_start_loc[r+1]`` (decode requests first, then
    prefill chunks, no padding between them). Tensors stay on the model's
    device; the ints come from the metadata's host-side fields, so building
    this view never synchronises with the device.
    """

    index: int  # forward passes with metadata seen so far by this worker
    num_tokens: int
    max_query_len: int
    positions: torch.Tensor  # [num_tokens] absolute position in its sequence
    query_start_loc: torch.Tensor  # [num_requests + 1] int32
    seq_lens: torch.Tensor  # [num_requests] context + this step's tokens

    @property
    def num_requests(self) -> int:
        return self.query_start_loc.shape[0] - 1

    @property
    def is_decode_only(self) -> bool:
        """Every request contributes exactly one token (no speculative decoding)."""
        return self.max_query_len == 1

    @property
    def query_lens(self) -> torch.Tensor:  # [num_requests]
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def context_lens(self) -> torch.Tensor:  # [num_requests] tokens already in the KV cache
        return self.seq_lens - self.query_lens

    @property
    def is_decode(self) -> torch.Tensor:  # [num_requests] bool
        return self.query_lens == 1

    # Computed once per step (cached on the instance), read by every layer.
    @functools.cached_property
    def request_of_token(self) -> torch.Tensor:  # [num_tokens] int64
        return torch.repeat_interleave(
            torch.arange(self.num_requests, device=self.query_start_loc.device),
            self.query_lens,
            output_size=self.num_tokens,
        )

    @functools.cached_property
    def token_seq_lens(self) -> torch.Tensor:  # [num_tokens] int32
        """Each token's sequence length up to and including it (its KV-cache context)."""
        return (self.positions + 1).to(torch.int32)


class PruningMethod:
    """Base class: runs every block dense. Subclasses override what they need."""

    # --- traits: what the method is, asked by config, validation, metrics and tools
    # The name users type (``--pp-method``); "" for abstract bases.
    name: ClassVar[str] = ""
    # It reads a calibration file (``--pp-calibration``) and cannot run without one.
    needs_calibration: ClassVar[bool] = False
    # It keeps every unit (runs the pruned layers, prunes nothing).
    keeps_everything: ClassVar[bool] = False
    # It runs the pruned layers even at ratio 0 (the calibration recorder).
    active_at_ratio_zero: ClassVar[bool] = False
    # It learns a history while serving, which ``--pp-history`` persists.
    keeps_history: ClassVar[bool] = False
    # The statistics file kind :meth:`export` writes (``vllm-pp calibrate``), if any.
    exports: ClassVar[str | None] = None
    # Keys it accepts in ``method_options`` (its own options section).
    options: ClassVar[tuple[str, ...]] = ()

    # Set by the runtime before the first step: the step path must not wait for
    # the device (no data-dependent sizes), so that a CUDA graph can hold it.
    capturable: bool = False

    def __init__(
        self,
        config: ProbePruningConfig,
        blocks: list[PrunableBlock],
        worker: WorkerInfo,
    ) -> None:
        self.check_options(config)
        self.config = config
        self.blocks = blocks
        self.worker = worker

    @classmethod
    def check_options(cls, config: ProbePruningConfig) -> None:
        """Refuse ``method_options`` keys this method does not have."""
        unknown = sorted(set(config.method_options) - set(cls.options))
        if unknown:
            allowed = ", ".join(cls.options) or "none"
            raise ProbePruningConfigError(
                f"probe_pruning.method_options.{unknown[0]} is not an option of method "
                f"{config.method!r}: expected {allowed}"
            )

    @classmethod
    def check_config(cls, config: ProbePruningConfig) -> None:
        """Refuse options, and files the config names or lacks, against this method's traits."""
        cls.check_options(config)
        if cls.needs_calibration and not config.calibration:
            raise ProbePruningConfigError(
                f"probe_pruning.method={config.method!r} needs a calibration file "
                "(--pp-calibration PATH, written by `vllm-pp calibrate`)"
            )
        if config.history.path and not cls.keeps_history:
            raise ProbePruningConfigError(
                f"probe_pruning.history.path={config.history.path!r} is set but method "
                f"{config.method!r} keeps no history: drop --pp-history or use method 'probe'"
            )

    @functools.cached_property
    def layer_ratio(self) -> float:
        """The share pruned in each pruned layer (docs/algorithm.md 3.5)."""
        return layer_ratio(self.config.ratio, self.worker.num_layers, len(self.config.skip_layers))

    def kept_unit_count(self, block: PrunableBlock) -> int:
        """Units ``block`` keeps at :attr:`layer_ratio` (heads exact, channels rounded up)."""
        if block.kind == "attention":
            return num_kept_heads(block.num_units, self.layer_ratio)
        return num_kept_channels(block.num_units, self.layer_ratio, self.config.channel_multiple)

    def prepare(self, output_weights: Mapping[PrunableBlock, torch.Tensor]) -> None:
        pass

    def decide(
        self,
        block: PrunableBlock,
        batch: StepBatch,
        residual: torch.Tensor,  # [num_tokens, hidden] residual stream entering the block
        probe: Probe,
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

    def export(self) -> dict[str, torch.Tensor]:
        """This rank's statistics under their file names (methods with ``exports`` set)."""
        return {}

    def history_layout(self) -> dict | None:
        """What a saved history must match to be loaded; None when there is no history."""
        return None

    def history_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's history under its file names."""
        return {}

    def load_history(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the history with a saved one (names without the rank part)."""

    def history_health(self) -> dict:
        """Non-finite values in the history and rows skipped by its update (None: no history).

        May read device values: called off the hot path (the metrics reporter).
        """
        return {"nonfinite_values": None, "skipped_rows": None}
