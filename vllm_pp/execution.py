"""Pruned execution: the one place that turns kept heads/channels into compute.

Each pruned block keeps its kept units' weight rows packed in a
:class:`PackedUnits`, whose slots persist across steps, and runs its output
projection (and for MLPs its input projection) on the packed rows, mirroring
what vLLM's parallel linears do around the GEMM (bias once, all-reduce across
TP ranks). Attention itself and the KV cache are vllm_pp/attention.py's.

Why packed slots rather than gathering the kept rows every step: at 7B widths
a per-step ``index_select`` of the kept weights costs as much as the dense
GEMM (docs/design.md, "Making pruning pay"). Consecutive decisions overlap
heavily (about 86% of the kept MLP channels stay from one decode step to the
next on SmolLM2), so only the units that enter are copied, into the slots of
the units that left. A decision that did not change (static methods, a reused
PP decision) costs nothing at all.

The row-parallel output projections (o_proj, down_proj, fc2) keep their weight
transposed in memory (:func:`transpose_storage_`): the input channels of a unit
are then contiguous rows, which is what packing copies.

GEMM kernel on the CPU (:func:`linear`): vLLM runs its weights on oneDNN
(prepacked at load), whose fp32 kernel is 1.3-2.3x faster than ``F.linear``
(MKL) for 4-512 tokens at 7B widths (benchmarks/gemm_paths.py). Prepacking
packed weights that change every step would cost about three GEMM passes, so
the pruned GEMMs call oneDNN's matmul on the plain tensors instead
(``torch.ops.mkldnn._linear_pointwise``), which is as fast as vLLM's prepacked
path here and reads the packed rows in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_pp.algorithm.selection import kept_heads_to_channels
from vllm_pp.attention import StepAttention
from vllm_pp.profiling import timed
from vllm_pp.vllm_compat import all_reduce_row_parallel


def _mkldnn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_MKLDNN_LINEAR = _mkldnn_linear_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (x [T, K], weight [N, K] with any strides): oneDNN on the CPU."""
    if _MKLDNN_LINEAR and x.is_cpu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# The GEMMs on packed weights, under their own profiling section.
_pruned_linear = timed("pruned GEMMs")(linear)


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

    def __init__(self, sources: list[torch.Tensor], unit_rows: int):
        self.sources = sources
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


def pack_attention_output(o_proj, head_dim: int) -> PackedUnits:
    """Packed rows of o_proj's transposed weight, head_dim rows per head."""
    return PackedUnits([transpose_storage_(o_proj).unsqueeze(0)], head_dim)


def pack_gated_mlp(gate_up_proj, down_proj) -> PackedUnits:
    """Packed gate and up rows ([2, K, H]) and down's transposed rows ([1, K, H]).

    gate_up_proj's local rows are [gate (I_local) | up (I_local)]; channel c
    owns gate row c and up row I_local + c.
    """
    width = down_proj.input_size_per_partition
    gate_up = gate_up_proj.weight.view(2, width, -1)
    sources = [gate_up, transpose_storage_(down_proj).unsqueeze(0)]
    if gate_up_proj.bias is not None:
        sources.append(gate_up_proj.bias.view(2, width, 1))
    return PackedUnits(sources, 1)


def pack_plain_mlp(fc1, fc2) -> PackedUnits:
    """Packed fc1 rows ([1, K, H]), fc2's transposed rows ([1, K, H]) and fc1's bias ([1, K, 1])."""
    sources = [fc1.weight.unsqueeze(0), transpose_storage_(fc2).unsqueeze(0)]
    if fc1.bias is not None:
        sources.append(fc1.bias.view(1, -1, 1))
    return PackedUnits(sources, 1)


def _packed_bias(packed: PackedUnits) -> torch.Tensor | None:
    """The packed input-projection bias ([S * K]), if the block has one (it is the last source)."""
    return packed.packed[2].reshape(-1) if len(packed.packed) == 3 else None


def row_parallel_output(linear, partial: torch.Tensor, correction: torch.Tensor | None) -> torch.Tensor:
    """Finish a row-parallel projection from this rank's partial product ([T, out]).

    ``correction`` ([out], this rank's share) joins the partial sum before the
    all-reduce. The bias is added once, after the all-reduce, as
    RowParallelLinear does (it adds it on rank 0 only).
    """
    if correction is not None:
        partial = partial + correction
    output = all_reduce_row_parallel(partial, linear)
    if linear.bias is not None and not linear.skip_bias_add:
        output = output + linear.bias
    return output


def attention_output(
    packed: PackedUnits, o_proj, heads: StepAttention, kept_heads: torch.Tensor, correction=None
):
    """o_proj over the kept heads only.

    heads: the step's attention (vllm_pp/attention.py), asked for the kept
    heads' output only. Returns (output [T, hidden], kept activations
    [T, K * head_dim], their channels [K * head_dim]); the activations'
    columns are in slot order.
    """
    packed.load(kept_heads)
    kept_out = heads.heads(packed.slot_units, packed.slot_rows)  # [T, K * hd], slot order
    output = row_parallel_output(o_proj, _pruned_linear(kept_out, packed.weight(0, rows_are_outputs=False)), correction)
    return output, kept_out, packed.slot_rows


def gated_mlp(packed: PackedUnits, act_fn, down_proj, x: torch.Tensor, kept: torch.Tensor, correction=None):
    """LLaMA MLP on kept intermediate channels.

    Returns (output [T, hidden], intermediate [T, K], its channels [K]), in slot order.
    """
    packed.load(kept)
    intermediate = act_fn(_pruned_linear(x, packed.weight(0, rows_are_outputs=True), _packed_bias(packed)))
    output = row_parallel_output(down_proj, _pruned_linear(intermediate, packed.weight(1, rows_are_outputs=False)), correction)
    return output, intermediate, packed.slot_rows


def plain_mlp(packed: PackedUnits, act_fn, fc2, x: torch.Tensor, kept: torch.Tensor, correction=None):
    """OPT MLP (fc1, activation, fc2) on kept channels: (output, intermediate, its channels), as gated_mlp."""
    packed.load(kept)
    intermediate = act_fn(_pruned_linear(x, packed.weight(0, rows_are_outputs=True), _packed_bias(packed)))
    output = row_parallel_output(fc2, _pruned_linear(intermediate, packed.weight(1, rows_are_outputs=False)), correction)
    return output, intermediate, packed.slot_rows
