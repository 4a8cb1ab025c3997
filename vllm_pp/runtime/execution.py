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


class KeptUnits:
    """What both forms of a block's kept weights share: the sources and the slots.

    ``sources`` are the block's matrices whose rows belong to units: each is
    ``[S, U * w, D]`` (S matrices sharing the unit axis, e.g. gate and up), with
    ``w`` = ``unit_rows`` consecutive rows per unit (head_dim for heads, 1 for
    channels). :meth:`load` makes the slots hold the K kept units;
    ``slot_units`` names the unit of each slot and ``slot_rows`` the source row
    of each of their rows (the block adapters return it with their activations).
    """

    def __init__(self, sources: list[torch.Tensor], unit_rows: int):
        self.sources = sources
        self.unit_rows = unit_rows
        self.kept: torch.Tensor | None = None  # the decision the slots hold
        self.slot_units: torch.Tensor | None = None  # [K] unit of each slot
        self.slot_rows: torch.Tensor | None = None  # [K * w] source row of each slot row

    @timed("weight preparation")
    def load(self, kept: torch.Tensor) -> None:
        """Make the slots hold the units ``kept`` (ascending LongTensor [K])."""
        if kept is self.kept:
            return  # the same decision as the step before: nothing moves
        if self.slot_units is None or kept.numel() != self.slot_units.numel():
            self._load_all(kept)
        else:
            self._change(kept)
        self.kept = kept

    def _rows(self, units: torch.Tensor) -> torch.Tensor:
        """Source rows of ``units``, ``unit_rows`` consecutive rows each."""
        return units if self.unit_rows == 1 else kept_heads_to_channels(units, self.unit_rows)

    def _load_all(self, kept: torch.Tensor) -> None:
        """A first decision, or one of another size: new slot buffers."""
        raise NotImplementedError

    def _change(self, kept: torch.Tensor) -> None:
        """Another decision of the same size, into the same slot buffers."""
        raise NotImplementedError


class PackedUnits(KeptUnits):
    """The rows of a block's kept units copied into slots that persist across steps.

    :meth:`load` makes ``packed[i]`` (``[S, K * w, D]``) hold the rows of the K
    kept units, one unit per slot; the order of the slots is whatever the
    swaps left.
    """

    def __init__(self, sources: list[torch.Tensor], unit_rows: int, *, capturable: bool = False):
        super().__init__(sources, unit_rows)
        # Capturable: a new decision gathers every kept row (fixed sizes, no
        # device synchronisation); otherwise only the entering units are copied
        # (their number is data-dependent).
        self.capturable = capturable
        self.num_units = sources[0].shape[1] // unit_rows
        self.packed: list[torch.Tensor] = []
        self.held = torch.zeros(self.num_units, dtype=torch.bool, device=sources[0].device)

    def output_rows(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, D]`` through source ``index``'s kept rows as output features
        (gate/up, fc1): ``[T, S * K * w]``, sections one after the other, slot order."""
        packed = self.packed[index]
        return pruned_linear(x, packed.view(-1, packed.shape[-1]))

    def input_rows(self, index: int, a: torch.Tensor) -> torch.Tensor:
        """``a`` ``[T, K * w]`` (columns in slot order) through source ``index``'s kept rows as
        input features (the transposed o_proj, down, fc2): ``[T, D]``."""
        packed = self.packed[index]
        return pruned_linear(a, packed.view(-1, packed.shape[-1]).t())

    def rows_of(self, index: int) -> torch.Tensor:
        """Source ``index``'s kept rows, ``[S, K * w, D]`` in slot order."""
        return self.packed[index]

    def extra_bytes(self) -> int:
        """Memory held beyond the block's own weights: the packed copies."""
        return sum(t.nbytes for t in self.packed)

    def _load_all(self, kept: torch.Tensor) -> None:
        self.slot_units = kept.clone()
        self.slot_rows = self._rows(kept).clone()
        self.packed = [source.index_select(1, self.slot_rows) for source in self.sources]
        self.held = torch.zeros_like(self.held).index_fill_(0, kept, True)

    def _change(self, kept: torch.Tensor) -> None:
        if self.capturable:
            self._gather_in_place(kept)
        else:
            self._swap(kept)

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


class GatheredUnits(KeptUnits):
    """The kept units read in place from the block's weights, by index: no packed copy.

    The same interface as :class:`PackedUnits` (each source with contiguous
    rows); a decision only records its rows (fixed-size copies into the same
    small buffers, so a CUDA graph can hold it) and the GEMMs gather the rows as
    they read them (vllm_pp/runtime/gather_gemm.py, Triton). Slots are the kept
    units in ascending order.
    """

    def __init__(self, sources: list[torch.Tensor], unit_rows: int):
        super().__init__(sources, unit_rows)
        self.section_rows: list[torch.Tensor] = []  # per source: [S * K * w] rows of its flat [S * U * w, D] view

    def _load_all(self, kept: torch.Tensor) -> None:
        self.slot_units, self.slot_rows = kept.clone(), self._rows(kept).clone()
        self.section_rows = [self._section_rows(source, self.slot_rows) for source in self.sources]

    def _change(self, kept: torch.Tensor) -> None:
        self.slot_units.copy_(kept)
        self.slot_rows.copy_(self._rows(kept))
        for target, source in zip(self.section_rows, self.sources):
            target.copy_(self._section_rows(source, self.slot_rows))

    @staticmethod
    def _section_rows(source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of every section of ``source`` ([S, R, D]) in its flat [S * R, D] view."""
        sections, height = source.shape[0], source.shape[1]
        offsets = torch.arange(sections, device=rows.device).unsqueeze(1) * height
        return (offsets + rows.unsqueeze(0)).reshape(-1)

    @timed("pruned GEMMs")
    def output_rows(self, index: int, x: torch.Tensor) -> torch.Tensor:
        from vllm_pp.runtime.gather_gemm import gather_rows_linear

        source = self.sources[index]
        return gather_rows_linear(x, source.reshape(-1, source.shape[-1]), self.section_rows[index])

    @timed("pruned GEMMs")
    def input_rows(self, index: int, a: torch.Tensor) -> torch.Tensor:
        from vllm_pp.runtime.gather_gemm import gather_rows_matmul

        source = self.sources[index]
        return gather_rows_matmul(a.contiguous(), source.reshape(-1, source.shape[-1]), self.section_rows[index])

    def extra_bytes(self) -> int:
        """Memory held beyond the block's own weights: the row indices only."""
        return sum(t.nbytes for t in self.section_rows)

    def rows_of(self, index: int) -> torch.Tensor:
        source = self.sources[index]
        return source.reshape(-1, source.shape[-1]).index_select(0, self.section_rows[index]).view(
            source.shape[0], -1, source.shape[-1])
