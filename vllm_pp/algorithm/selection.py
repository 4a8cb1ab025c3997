"""Pruning ratios, kept counts and kept indices (docs/algorithm.md 3.3, 3.5 and 5).

Counts mirror the official code's float arithmetic (``floor(r * n)``,
``round(., 2)``) so kept counts match its runs exactly.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from vllm_pp.algorithm.scores import flap_head_scores


def layer_ratio(ratio: float, num_layers: int, num_skipped: int) -> float:
    """Per-layer ratio ``r' = round(r * L / (L - skipped), 2)`` (docs/algorithm.md 3.5), capped at 1.

    Spreads the model-wide ratio ``r`` over the pruned layers only. The product
    is evaluated in the official code's order (``L / (L - s) * r``) so the
    two-decimal rounding agrees with it; e.g. 32 layers, 3 skipped:
    0.2 -> 0.22, 0.4 -> 0.44; 40 layers, 3 skipped: 0.4 -> 0.43.
    """
    if not 0 <= num_skipped < num_layers:
        raise ValueError(f"need 0 <= num_skipped < num_layers, got {num_skipped}, {num_layers}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    # A ratio near 1 with skipped layers would ask for more than everything.
    return min(1.0, round(num_layers / (num_layers - num_skipped) * ratio, 2))


def num_kept_heads(num_heads: int, ratio: float) -> int:
    """Heads kept in a layer: ``H - floor(ratio * H)``, at least 1 (docs/algorithm.md 3.3; no rounding)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return max(1, num_heads - math.floor(ratio * num_heads))


def _round_kept_up(kept: int, width: int, multiple: int) -> int:
    """Round a kept count (>= 1) up to a multiple of ``multiple``, capped at ``width``.

    Equivalent to the code's "reduce the pruned count until the kept count is a
    multiple" (docs/algorithm.md 3.3); the cap covers widths that are not themselves multiples.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return min(width, -(-max(1, kept) // multiple) * multiple)


def num_kept_channels(width: int, ratio: float, multiple: int) -> int:
    """MLP channels kept: prune ``floor(ratio * width)``, round the kept count up to ``multiple``.

    ``multiple=1`` disables rounding (the code's ``noround``); the paper uses 64
    (tensor-core friendly). LLaMA-2-7B (I=11008, multiple 64): r'=0.44 -> 6208,
    r'=0.22 -> 8640. At least 1 channel is kept.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return _round_kept_up(width - math.floor(ratio * width), width, multiple)


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, in ascending index order.

    scores: ``[N]`` float. Returns LongTensor ``[k]``. Exact, deterministic
    ties: among units tied with the k-th highest score the lower indices win.
    NaN scores rank lowest (an undefined score is no evidence that a unit
    matters). Every operation has a size known from ``N`` and ``k`` alone, so
    nothing waits for the device (no ``nonzero``) and a CUDA graph can hold it.
    """
    if scores.dim() != 1 or not 0 <= k <= scores.numel():
        raise ValueError(f"need 1-D scores and 0 <= k <= N, got {tuple(scores.shape)}, k={k}")
    ranked = torch.where(torch.isnan(scores), float("-inf"), scores)
    if k == 1:
        # A decode step's probe is one token: argmax returns the first maximum.
        return ranked.argmax().reshape(1)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    # Everything above the k-th score, then the lowest-index ties with it.
    # (topk's own tie order is unspecified; two stable sorts give the same
    # result at several times the cost on the CPU.)
    threshold = torch.topk(ranked, k, sorted=False).values.min()
    above = ranked > threshold
    ties = ranked == threshold
    kept = above | (ties & (ties.cumsum(0) <= k - above.sum()))  # exactly k True
    # The i-th kept unit goes to slot i; the others to a spare slot k, dropped.
    slots = torch.where(kept, kept.cumsum(0) - 1, k)
    units = torch.arange(scores.numel(), device=scores.device)
    return torch.empty(k + 1, dtype=torch.long, device=scores.device).scatter_(0, slots, units)[:k]


def num_kept_groups(kept_heads: int, group_size: int) -> int:
    """KV groups kept when a layer keeps ``kept_heads`` query heads by whole group.

    Rounds ``kept_heads / group_size`` to the nearest whole group, halves up
    (keeping more), at least one group: the kept share of heads stays within
    half a group of the layer's ratio. Rounding up, as the MLP channel counts
    are (3.3), would miss the ratio by up to a whole group, and a group is a
    large share of a layer (SmolLM2: a third of its 9 heads; LLaMA-3-8B: an
    eighth of 32), where a channel multiple of 64 is a few percent of an MLP.
    ``group_size`` 1 (MHA) gives ``kept_heads`` back. Examples: 9 heads in 3
    groups of 3, 6 kept -> 2 groups, 8 kept -> 3 (every head); 32 heads in 8
    groups of 4, 18 kept -> 5 groups (4.5, halves up), 25 kept -> 6 (6.25).
    """
    if group_size < 1 or kept_heads < 0:
        raise ValueError(f"need group_size >= 1 and kept_heads >= 0, got {group_size}, {kept_heads}")
    # floor(kept / size + 1/2) in integers.
    return max(1, (2 * kept_heads + group_size) // (2 * group_size))


def top_k_head_groups(head_scores: Tensor, group_size: int, kept_heads: int) -> Tensor:
    """Kept query heads, chosen by whole KV group (grouped-query attention).

    A decode attention kernel reads a KV head's cache when any of its query
    heads is kept, so under GQA pruning saves cache reads only where a whole
    group goes. Query head ``h`` belongs to KV group ``h // group_size``
    (vLLM's layout: consecutive query heads share a KV head; under tensor
    parallelism the heads and groups of one rank).

    A group scores the **sum** of its query heads' scores (for equal group
    sizes the mean ranks groups identically); the top
    :func:`num_kept_groups` ``(kept_heads, group_size)`` groups are kept by
    :func:`top_k_indices`, so ties go to the lower group and a group with a
    NaN head score ranks lowest. With ``group_size`` 1 (MHA) and
    ``kept_heads >= 1`` this is ``top_k_indices(head_scores, kept_heads)``, bit
    for bit.

    head_scores: ``[H]`` float, ``H`` a multiple of ``group_size``. Returns
    LongTensor ``[num_kept_groups * group_size]``, ascending. Fixed-size
    operations only (no ``nonzero``, no host read), so a CUDA graph can hold it.
    """
    num_heads = head_scores.numel()
    if head_scores.dim() != 1 or group_size < 1 or num_heads % group_size:
        raise ValueError(f"need 1-D scores of whole groups of {group_size}, got {tuple(head_scores.shape)}")
    num_groups = num_heads // group_size
    kept_groups = min(num_groups, num_kept_groups(kept_heads, group_size))
    group_scores = head_scores.reshape(num_groups, group_size).sum(dim=1)  # [G]
    groups = top_k_indices(group_scores, kept_groups)  # [K_g] ascending
    # A group's query heads are contiguous, as a head's channels are.
    return kept_heads_to_channels(groups, group_size)  # [K_g * group_size] ascending


def kept_heads_to_channels(kept_heads: Tensor, head_dim: int) -> Tensor:
    """Input-channel indices of the kept heads (head h owns ``[h*hd, (h+1)*hd)``).

    kept_heads: LongTensor ``[H_kept]``. Returns LongTensor ``[H_kept * head_dim]``,
    ascending when ``kept_heads`` is.
    """
    offsets = torch.arange(head_dim, device=kept_heads.device, dtype=kept_heads.dtype)
    return (kept_heads.unsqueeze(1) * head_dim + offsets).reshape(-1)


def _standardise(scores: Tensor) -> Tensor:
    """``(x - mean) / std`` over one layer's units in float64; unbiased std, as in the code.

    A constant layer (std 0, or a single unit) maps to zeros instead of NaN.
    """
    x = scores.double()
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    centred = x - x.mean()
    return centred / std if std > 0 else torch.zeros_like(centred)


def flap_allocation(
    attention_channel_scores: Sequence[Tensor],
    num_heads: int,
    mlp_channel_scores: Sequence[Tensor],
    ratio: float,
    head_cost: float,
    channel_cost: float,
    channel_multiple: int = 1,
) -> tuple[list[int], list[int]]:
    """FLAP's global adaptive structure (docs/algorithm.md 5, steps 1-5): kept units per layer.

    attention_channel_scores: per pruned layer, ``[H * hd]`` FLAP channel scores
    of o_proj; mlp_channel_scores: per pruned layer, ``[I_l]`` scores of
    down_proj. Either list may be empty (e.g. MLP-only pruning for LLaMA-3).

    1. Standardise each layer's attention channel scores and MLP channel scores
       separately (this is where FLAP's standardisation happens).
    2. Reduce each head to the mean of its standardised channel scores.
    3. Pool all heads and channels of all layers, each weighted by its cost.
    4. Sort ascending (stable: ties go to the earlier unit, attention layers
       first) and prune the smallest prefix whose cost reaches ``ratio`` times
       the total cost.
    5. Count each layer's pruned units; keep at least 1 head and 1 channel,
       and round kept channels up to ``channel_multiple``.

    ``ratio`` is the per-layer ratio ``r'`` from :func:`layer_ratio` (the code
    passes ``r'``, since skipped layers are not in the pool). Only
    ``head_cost / channel_cost`` matters. Per token, for LLaMA (D hidden, hd
    head dim): a channel costs ``3 * D`` (gate, up, down); an MHA head costs
    ``4 * D * hd`` (q, k, v, o rows/columns), and the official code adds the
    attention core ``2 * S * hd`` for context length S (``max_seq_len``). Under
    GQA K/V are not pruned (docs/algorithm.md 3.4), so a head costs ``2 * D * hd`` (q, o)
    plus the core, as in the code.

    Returns ``(kept_heads, kept_channels)``: one int per layer of each list.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if head_cost <= 0 or channel_cost <= 0:
        raise ValueError(f"costs must be positive, got {head_cost}, {channel_cost}")
    # Offline and tiny next to a forward pass: work on the CPU in float64.
    num_attn = len(attention_channel_scores)
    units = [flap_head_scores(_standardise(s.cpu()), num_heads).double()
             for s in attention_channel_scores]
    units += [_standardise(s.cpu()) for s in mlp_channel_scores]
    if not units:
        return [], []
    sizes = [u.numel() for u in units]
    unit_costs = [head_cost] * num_attn + [channel_cost] * len(mlp_channel_scores)
    scores = torch.cat(units)
    costs = torch.cat(
        [torch.full((n,), c, dtype=torch.float64) for n, c in zip(sizes, unit_costs)]
    )
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.sort(scores, stable=True).indices
    cumulative = torch.cumsum(costs[order], dim=0)
    target = ratio * cumulative[-1]
    num_pruned = 0
    if ratio > 0:
        # First prefix whose cost reaches the target (float rounding may put the
        # full total a hair below it; never prune more than everything).
        num_pruned = min(len(order), int(torch.searchsorted(cumulative, target).item()) + 1)
    pruned = torch.bincount(group[order[:num_pruned]], minlength=len(sizes)).tolist()
    kept = [n - p for n, p in zip(sizes, pruned)]
    kept_heads = [max(1, k) for k in kept[:num_attn]]
    kept_channels = [
        _round_kept_up(k, n, channel_multiple) for k, n in zip(kept[num_attn:], sizes[num_attn:])
    ]
    return kept_heads, kept_channels


def flap_unit_costs(
    model_identity: Mapping, hidden: int, head_dim: int, context: int
) -> tuple[float, float]:
    """Per-token cost ``(head_cost, channel_cost)`` of one head and one MLP channel, as FLAP counts them.

    A head: its q, k, v, o rows/columns, ``4 * D * hd`` (``2 * D * hd``, q and o,
    under grouped-query attention, whose K/V are never pruned), plus the
    attention core over ``context`` tokens, ``2 * S * hd``. A channel: gate, up,
    down, ``3 * D`` (OPT's fc1, fc2: ``2 * D``). ``model_identity``: the
    checkpoint's ``model_type``, ``num_attention_heads`` and
    ``num_key_value_heads`` (vllm_pp/storage/statistics.py). These weigh the
    units of :func:`flap_allocation`, whose ``ratio`` is a share of their sum.
    """
    heads = model_identity["num_attention_heads"]
    grouped = (model_identity.get("num_key_value_heads") or heads) < heads  # OPT has no KV head count: MHA
    head_cost = (2 if grouped else 4) * hidden * head_dim + 2 * context * head_dim
    channel_cost = (2 if model_identity["model_type"] == "opt" else 3) * hidden
    return float(head_cost), float(channel_cost)


def removed_cost_share(
    kept_heads: Sequence[int],
    num_heads: int,
    kept_channels: Sequence[int],
    widths: Sequence[int],
    head_cost: float,
    channel_cost: float,
) -> float:
    """Share of the blocks' head and channel cost that the kept counts remove.

    kept_heads: per attention block; kept_channels, widths: per MLP block.
    """
    total = len(kept_heads) * num_heads * head_cost + sum(widths) * channel_cost
    kept = sum(kept_heads) * head_cost + sum(kept_channels) * channel_cost
    return 1.0 - kept / total if total else 0.0


def flap_allocation_removing(
    attention_channel_scores: Sequence[Tensor],
    num_heads: int,
    mlp_channel_scores: Sequence[Tensor],
    share: float,
    head_cost: float,
    channel_cost: float,
    channel_multiple: int = 1,
    steps: int = 20,
) -> tuple[list[int], list[int]]:
    """:func:`flap_allocation` at the smallest ratio whose counts remove at least ``share`` of the cost.

    The counts :func:`flap_allocation` returns remove less than its ratio, by
    the kept channels' rounding up to ``channel_multiple`` and the one head
    kept per layer. This searches the ratio (bisection; the removed share only
    grows with it) so that the counts remove ``share`` or just above it (by
    less than one step of the rounding), e.g. the share another allocation's
    counts remove, which makes the two compute-matched. ``steps`` 20 finds the
    ratio to within 1e-6, below any one unit's share of a model's cost.
    """
    widths = [s.numel() for s in mlp_channel_scores]

    def allocate(ratio: float) -> tuple[float, tuple[list[int], list[int]]]:
        heads, channels = flap_allocation(attention_channel_scores, num_heads, mlp_channel_scores,
                                          ratio, head_cost, channel_cost, channel_multiple)
        return removed_cost_share(heads, num_heads, channels, widths, head_cost, channel_cost), (heads, channels)

    low, high = 0.0, 1.0
    best = allocate(high)[1]
    for _ in range(steps):
        middle = (low + high) / 2
        removed, counts = allocate(middle)
        if removed >= share:
            high, best = middle, counts
        else:
            low = middle
    return best
