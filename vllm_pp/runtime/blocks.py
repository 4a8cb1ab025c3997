"""The two prunable blocks of a decoder layer, as the pruned path runs them.

One adapter per block kind, shared by every architecture (LLaMA, OPT). Each
wraps the model's own modules (vLLM's linears and activation, or anything with
the same call convention: a linear returns ``(output, bias)``) and offers what
:class:`vllm_pp.runtime.pruning.BlockPruner` asks of a block:

* ``probe(inputs, rows)``: the output projection's input for the step's tokens
  ``rows`` ([P]): [P, width];
* ``dense(inputs)``: the block's output as the model computes it;
* ``pruned(inputs, kept, correction)``: the output on the kept units only, with
  the output projection's input of the kept channels and those channels
  (``[T, K * w]`` and ``[K * w]``, in the packed slots' order).

``inputs`` is what the block reads: the normalised hidden states ``x`` [T,
hidden] for an MLP, the step's attention (:class:`StepAttention`) for the
attention output. The output projection is row-parallel: this rank holds the
input channels of its own heads/channels, so a pruned output is a partial sum
finished as vLLM's RowParallelLinear finishes it (all-reduce, then the bias once).
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_pp.runtime.attention import StepAttention
from vllm_pp.runtime.execution import GatheredUnits, PackedUnits, linear, transpose_storage_

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def kept_units(sources, unit_rows: int, capturable: bool, gathered: bool) -> PackedUnits | GatheredUnits:
    return GatheredUnits(sources, unit_rows) if gathered else PackedUnits(sources, unit_rows, capturable=capturable)


class OutputProjection:
    """A row-parallel output projection (o_proj, down_proj, fc2) and how its rank's sum is finished.

    ``all_reduce``: sums a partial output over the TP ranks, None on one rank
    (vllm_pp/integration/vllm_compat.py gives vLLM's).
    """

    def __init__(self, linear: torch.nn.Module, all_reduce: AllReduce | None = None):
        self.linear = linear
        self.all_reduce = all_reduce

    @property
    def weight(self) -> torch.Tensor:  # [hidden, width] on this rank
        return self.linear.weight

    def finish(self, partial: torch.Tensor, correction: torch.Tensor | None) -> torch.Tensor:
        """The block's output from this rank's partial product ``[T, hidden]``.

        ``correction`` ([hidden], this rank's share) joins the partial sum
        before the all-reduce; the bias is added once, after it.
        """
        if correction is not None:
            partial = partial + correction
        output = partial if self.all_reduce is None else self.all_reduce(partial)
        bias = self.linear.bias
        if bias is not None and not getattr(self.linear, "skip_bias_add", False):
            output = output + bias
        return output


class PrunedAttentionOutput:
    """The attention block's output projection on the kept heads (the KV cache is never pruned)."""

    def __init__(self, output: OutputProjection, head_dim: int):
        self.output = output
        self.head_dim = head_dim
        self.packed: PackedUnits | GatheredUnits | None = None  # after weights load

    def prepare(self, capturable: bool = False, gathered: bool = False) -> None:
        """After weights load: o_proj's input rows (its transposed weight), head_dim per head,
        packed or read in place (``gathered``)."""
        self.packed = kept_units([transpose_storage_(self.output.linear).unsqueeze(0)], self.head_dim,
                                 capturable, gathered)

    def probe(self, heads: StepAttention, rows: torch.Tensor) -> torch.Tensor:
        return heads.probe_rows(rows)

    def every_row_computed(self, heads: StepAttention) -> bool:
        return heads.every_head_computed

    def dense(self, heads: StepAttention) -> torch.Tensor:
        return self.output.linear(heads.all_heads())[0]

    def pruned(self, heads: StepAttention, kept: torch.Tensor, correction: torch.Tensor | None):
        packed = self.packed
        packed.load(kept)
        kept_out = heads.heads(packed.slot_units, packed.slot_rows)  # [T, K * hd], slot order
        partial = packed.input_rows(0, kept_out)
        return self.output.finish(partial, correction), kept_out, packed.slot_rows


class PrunedMLP:
    """An MLP block on its kept intermediate channels: input projection, activation, output projection.

    LLaMA: gate_up_proj (rows [gate | up]) with SiluAndMul, ``gated=True``;
    OPT: fc1 with its activation. Channel c owns row c of every section of the
    input projection (and of its bias) and input column c of the output projection.
    """

    def __init__(
        self, input_projection: torch.nn.Module, act_fn: Callable, output: OutputProjection, *, gated: bool
    ):
        self.input_projection = input_projection
        self.act_fn = act_fn
        self.output = output
        self.num_sections = 2 if gated else 1
        self.packed: PackedUnits | GatheredUnits | None = None  # after weights load

    def prepare(self, capturable: bool = False, gathered: bool = False) -> None:
        """After weights load: the input projection's rows ([S, K, H]), the output
        projection's transposed rows ([1, K, H]) and the input bias ([S, K, 1]),
        packed or read in place (``gathered``)."""
        width = self.output.weight.shape[1]
        projection = self.input_projection
        sources = [
            projection.weight.view(self.num_sections, width, -1),
            transpose_storage_(self.output.linear).unsqueeze(0),
        ]
        if projection.bias is not None:
            sources.append(projection.bias.view(self.num_sections, width, 1))
        self.packed = kept_units(sources, 1, capturable, gathered)

    def probe(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [P] -> [P, width]
        projection = self.input_projection
        return self.act_fn(linear(x.index_select(0, rows), projection.weight, projection.bias))

    def every_row_computed(self, x: torch.Tensor) -> bool:
        return False  # the step's activations come only with the kept channels

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.input_projection(x)
        return self.output.linear(self.act_fn(hidden))[0]

    def pruned(self, x: torch.Tensor, kept: torch.Tensor, correction: torch.Tensor | None):
        packed = self.packed
        packed.load(kept)
        hidden = packed.output_rows(0, x)
        if len(packed.sources) == 3:  # the input projection's bias
            hidden = hidden + packed.rows_of(2).reshape(-1)
        intermediate = self.act_fn(hidden)
        partial = packed.input_rows(1, intermediate)
        return self.output.finish(partial, correction), intermediate, packed.slot_rows
