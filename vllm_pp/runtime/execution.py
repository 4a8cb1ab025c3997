"""Pruned execution: packed kept-unit weights and the GEMMs that run on them.

Each pruned block keeps its kept units' weight rows packed in a
:class:`PackedUnits`, whose slots persist across steps; the block adapters
(vllm_pp/runtime/blocks.py) run their projections on the packed rows.

Why packed slots rather than gathering the kept rows every step: at 7B widths
a per-step ``index_select`` of the kept weights costs as much as the dense
GEMM (docs/design.md, "Making pruning pay"). Consecutive decisions overlap
heavily, so only the units that enter are copied, into the slots of the units
that left. A decision that did not change (static methods, a reused PP
decision) costs nothing at all.

The row-parallel output projections (o_proj, down_proj, fc2) keep their weight
transposed in memory (:func:`transpose_storage_`): the input channels of a unit
are then contiguous rows, which is what packing copies.

GEMM kernel on the CPU (:func:`linear`): vLLM runs its weights on oneDNN
(prepacked at load), whose fp32 kernel beats ``F.linear`` (MKL) at 7B widths
(benchmarks/gemm_paths.py measures both). Prepacking packed weights that change
every step would cost several GEMM passes, so the pruned GEMMs call oneDNN's
matmul on the plain tensors instead (``torch.ops.mkldnn._linear_pointwise``),
which reads the packed rows in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_pp.algorithm.selection import kept_heads_to_channels
from vllm_pp.observability.profiling import timed


def _mkldnn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_MKLDNN_LINEAR = _mkldnn_linear_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (x [T, K], weight [N, K] with any strides): oneDNN on the CPU."""
    if _MKLDNN_LINEAR and x.is_cpu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# The GEMMs on packed weights, under their own profiling section.
pruned_linear = timed("pruned GEMMs")(linear)


class PackedUnits:
    """The rows of a block's kept units, in slots that persist across steps.

    ``sources`` are the block's matrices whose rows belong to units: each is
    ``[S, U * w, D]`` (S matrices sharing the unit axis, e.g. gate and up), with
    ``w`` = ``unit_rows`` consecutive rows per unit (head_dim for heads, 1 for
    channels). :meth:`load` makes ``packed[i]`` (``[S, K * w, D]``) hold the
    rows of the K kept units, one unit per slot; the order of the slots is
    whatever the swaps left, and ``slot_rows`` names the source row of every
    packed row (the block functions return it with their activations).
    """

    def __init__(self, sources: list[torch.Tensor], unit_rows: int, *, capturable: bool = False):
        self.sources = sources
        # Capturable: a new decision gathers every kept row (fixed sizes, no
        # device synchronisation); otherwise only the entering units are copied
        # (their number is data-dependent).
        self.capturable = capturable
        self.unit_rows = unit_rows
        self.num_units = sources[0].shape[1] // unit_rows
        self.packed: list[torch.Tensor] = []
        self.kept: torch.Tensor | None = None  # the decision the slots hold
        self.slot_units: torch.Tensor | None = None  # [K] unit of each slot
        self.slot_rows: torch.Tensor | None = None  # [K * w] source row of each packed row
        self.held = torch.zeros(self.num_units, dtype=torch.bool, device=sources[0].device)

    @timed("weight preparation")
    def load(self, kept: torch.Tensor) -> None:
        """Make the slots hold the units ``kept`` (ascending LongTensor [K])."""
        if kept is self.kept:
            return  # the same decision as the step before: nothing moves
        if self.slot_units is None or kept.numel() != self.slot_units.numel():
            self._load_all(kept)
        elif self.capturable:
            self._gather_in_place(kept)
        else:
            self._swap(kept)
        self.kept = kept

    def weight(self, index: int, *, rows_are_outputs: bool) -> torch.Tensor:
        """``packed[index]`` as a linear weight [N_out, K_in] (a view).

        ``rows_are_outputs``: the packed rows are output features (gate/up,
        fc1); otherwise they are input features (o_proj, down, fc2 rows).
        """
        packed = self.packed[index]
        rows = packed.view(-1, packed.shape[-1])
        return rows if rows_are_outputs else rows.t()

    def _rows(self, units: torch.Tensor) -> torch.Tensor:
        """Source rows of ``units``, ``unit_rows`` consecutive rows each."""
        return units if self.unit_rows == 1 else kept_heads_to_channels(units, self.unit_rows)

    def _load_all(self, kept: torch.Tensor) -> None:
        self.slot_units = kept.clone()
        self.slot_rows = self._rows(kept).clone()
        self.packed = [source.index_select(1, self.slot_rows) for source in self.sources]
        self.held = torch.zeros_like(self.held).index_fill_(0, kept, True)

    def _gather_in_place(self, kept: torch.Tensor) -> None:
        """Every kept row into the same buffers: fixed sizes, so every step (and
        every CUDA graph) reads and writes the same memory."""
        self.slot_units.copy_(kept)
        self.slot_rows.copy_(self._rows(kept))
        for source, packed in zip(self.sources, self.packed):
            torch.index_select(source, 1, self.slot_rows, out=packed)
        self.held.zero_().index_fill_(0, kept, True)

    def _swap(self, kept: torch.Tensor) -> None:
        wanted = torch.zeros_like(self.held).index_fill_(0, kept, True)
        entering = kept[~self.held.index_select(0, kept)]  # [E] units to bring in
        if entering.numel() == 0:
            return
        freed = (~wanted.index_select(0, self.slot_units)).nonzero().squeeze(1)  # [E] their slots
        self.slot_units.index_put_((freed,), entering)
        self.held = wanted
        freed_rows, entering_rows = self._rows(freed), self._rows(entering)
        self.slot_rows.index_put_((freed_rows,), entering_rows)
        # Row copies on 2-D views: index_put_ copies whole rows, several
        # times faster on the CPU than index_copy_ along a middle dimension.
        for source, packed in zip(self.sources, self.packed):
            for section, target in zip(source, packed):
                target.index_put_((freed_rows,), section.index_select(0, entering_rows))


def transpose_storage_(linear) -> torch.Tensor:
    """Store ``linear.weight`` ([out, in]) transposed in memory; return the [in, out] row view.

    The parameter keeps its shape, so vLLM's own forward (F.linear on the
    CPU's skip-dispatch path) still works; the view it returns has one
    contiguous row per input channel.
    """
    weight = linear.weight
    weight.data = weight.data.t().contiguous().t()
    return weight.t()
