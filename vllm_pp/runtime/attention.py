"""A pruned layer's attention at one step, computed for the heads the step needs.

The attention block needs three things from a layer's attention: the exact
output of a few probe tokens on every head (the probe), and then either every
head's output for every token (dense) or only the kept heads' (pruned).
:class:`StepAttention` is that interface. :class:`AllHeadsAttention` runs the
layer's attention on every head once and slices it (any backend); the CPU
kernel's kept-head attention is vllm_pp/integration/cpu_attention.py's;
:class:`ProbeOnlyAttention` swaps the probe for the paper's approximation.
"""

from __future__ import annotations

import torch

from vllm_pp.algorithm.probe import probe_only_attention
from vllm_pp.methods.base import StepBatch


class StepAttention:
    """One layer's attention output at one step; ``T`` tokens, ``H`` local heads of ``hd``."""

    # Every head's output of every token is already computed (all_heads() is a view).
    every_head_computed: bool = False

    def probe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every head's output for the tokens ``rows`` ([P]): [P, H * hd]."""
        raise NotImplementedError

    def all_heads(self) -> torch.Tensor:
        """Every head's output: [T, H * hd]."""
        raise NotImplementedError

    def heads(self, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """The output of ``heads`` ([K], any order): [T, K * hd], columns in that order.

        ``channels`` ([K * hd]) are the same heads' columns in :meth:`all_heads`.
        """
        raise NotImplementedError


class AllHeadsAttention(StepAttention):
    """The attention of every head, computed once; the rest are slices of it."""

    every_head_computed = True

    def __init__(self, output: torch.Tensor):
        self.output = output  # [T, H * hd]

    def probe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.output.index_select(0, rows)

    def all_heads(self) -> torch.Tensor:
        return self.output

    def heads(self, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return self.output.index_select(1, channels)


class ProbeOnlyAttention(StepAttention):
    """``probe.attention: probe-only``: the probe attends among the probe tokens only
    (the paper's approximation, docs/algorithm.md 1.3); everything else is ``step``'s.

    q: [T, H * hd], k and v: [T, KV * hd], after rotary.
    """

    def __init__(self, step: StepAttention, q, k, v, batch: StepBatch, *, head_dim: int, scale: float):
        self.step, self.q, self.k, self.v = step, q, k, v
        self.batch, self.head_dim, self.scale = batch, head_dim, scale

    def probe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        count, head_dim = rows.numel(), self.head_dim
        q_rows, k_rows, v_rows = (t.index_select(0, rows).view(count, -1, head_dim) for t in (self.q, self.k, self.v))
        return probe_only_attention(
            q_rows, k_rows, v_rows,
            self.batch.positions.index_select(0, rows),
            self.batch.request_of_token.index_select(0, rows),
            self.scale,
        ).to(self.q.dtype)

    def all_heads(self) -> torch.Tensor:
        return self.step.all_heads()

    def heads(self, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return self.step.heads(heads, channels)


class AttendEveryHead:
    """The default attention of a pruned layer: the layer's own call, on every head.

    ``attention`` is the model's attention module (vLLM's ``Attention``): called
    with q, k, v it writes the KV cache and returns every head's output.
    """

    def attend(self, attention: torch.nn.Module, q, k, v, batch: StepBatch | None) -> StepAttention:
        return AllHeadsAttention(attention(q, k, v))


def kv_head_runs(heads: list[int], group_size: int, num_kv_heads: int) -> list[tuple[int, int, int]]:
    """Kernel calls for the query heads ``heads`` (any order): (first KV head, end, heads per KV head).

    One call attends ``n`` query heads per KV head over a contiguous slice of
    KV heads, so consecutive KV heads keeping the same number of query heads
    share a call; KV heads keeping none are skipped (their cache is not read).
    """
    counts = [0] * num_kv_heads
    for head in heads:
        counts[head // group_size] += 1
    runs: list[tuple[int, int, int]] = []
    for kv_head, count in enumerate(counts):
        if count == 0:
            continue
        if runs and runs[-1][1] == kv_head and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], kv_head + 1, count)
        else:
            runs.append((kv_head, kv_head + 1, count))
    return runs
