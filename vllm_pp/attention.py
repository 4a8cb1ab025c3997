"""A pruned layer's attention at one step, computed for the heads the step needs.

The attention block needs three things from a layer's attention: the exact
output of a few probe tokens on every head (the probe), and then either every
head's output for every token (dense) or only the kept heads' (pruned). Two
classes give them behind one interface:

- :class:`AllHeadsAttention` runs vLLM's attention on every head once and
  slices it (any attention backend);
- :class:`KeptHeadsAttention` writes the KV cache of every head first (a head
  kept at a later step must find its cache whole), then runs vLLM's CPU
  paged-attention kernel only where asked: for the probe tokens as one-token
  queries over their real context, and for the whole step on the kept query
  heads (docs/design.md, "Attention on the kept heads").

Both return the same values as vLLM's own attention for the rows and heads
asked (tests/test_attention_heads.py).
"""

from __future__ import annotations

import torch

from vllm_pp.profiling import timed
from vllm_pp.step import StepBatch
from vllm_pp.vllm_compat import CpuPagedAttention, attend_after_cache_write, write_kv_cache


class StepAttention:
    """One layer's attention output at one step; ``T`` tokens, ``H`` local heads of ``hd``."""

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
    """vLLM's attention of every head, computed once; the rest are slices of it."""

    def __init__(self, output: torch.Tensor):
        self.output = output  # [T, H * hd]

    def probe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.output.index_select(0, rows)

    def all_heads(self) -> torch.Tensor:
        return self.output

    def heads(self, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return self.output.index_select(1, channels)


class KeptHeadsAttention(StepAttention):
    """Attention on vLLM's CPU kernel, run for the probe rows and the kept heads only.

    q: [T, H * hd] after rotary; the KV cache already holds this step's K/V of
    every head (:func:`attend_kept_heads` writes it).
    """

    def __init__(self, attention: torch.nn.Module, q, k, v, batch: StepBatch, schedules: "Schedules"):
        self.attention, self.k, self.v = attention, k, v
        self.batch = batch
        self.kernel = CpuPagedAttention(attention)
        self.schedules = schedules
        self.q = q.view(q.shape[0], -1, attention.head_size)  # [T, H, hd]
        self.group_size = attention.num_heads // attention.num_kv_heads  # query heads per KV head
        self._all_heads: torch.Tensor | None = None

    def probe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self._all_heads is None and rows.numel() == self.batch.num_tokens:
            self._all_heads = self._attend_all_heads()  # full-batch probing: the step's own attention
        if self._all_heads is not None:
            return self._all_heads.index_select(0, rows)
        # Each probe token is a one-token query over its request's context
        # (positions 0..its own, all in the cache after this step's write).
        metadata = self.kernel.metadata
        seq_lens = self.batch.token_seq_lens.index_select(0, rows)  # [P]
        block_table = metadata.block_table.index_select(0, self.batch.request_of_token.index_select(0, rows))
        query_start_loc = torch.arange(rows.numel() + 1, dtype=torch.int32, device=rows.device)
        num_heads = self.q.shape[1]
        schedule = self.kernel.schedule(num_heads, self.attention.num_kv_heads, query_start_loc, seq_lens)
        output = self.kernel.run(
            self.q.index_select(0, rows), slice(None), query_start_loc, seq_lens, block_table, schedule
        )
        return output.view(rows.numel(), -1)

    @timed("attention")
    def all_heads(self) -> torch.Tensor:
        if self._all_heads is None:
            self._all_heads = self._attend_all_heads()
        return self._all_heads

    def _attend_all_heads(self) -> torch.Tensor:
        return attend_after_cache_write(self.attention, self.q.view(self.q.shape[0], -1), self.k, self.v)

    @timed("attention")
    def heads(self, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        if self._all_heads is not None:
            return self._all_heads.index_select(1, channels)
        num_tokens = self.batch.num_tokens
        asked = heads.tolist()  # K <= local heads: the bookkeeping stays on the host
        ascending = sorted(asked)
        metadata = self.kernel.metadata
        outputs = []  # [T, n * kv, hd] per run of KV heads, ascending heads
        for first, end, per_kv in kv_head_runs(asked, self.group_size, self.attention.num_kv_heads):
            run = [h for h in ascending if first <= h // self.group_size < end]
            if run[-1] - run[0] + 1 == len(run):  # consecutive heads: a view (the kernel takes strided queries)
                query = self.q[:num_tokens].narrow(1, run[0], len(run))
            else:
                query = self.q[:num_tokens].index_select(1, torch.tensor(run, device=heads.device))
            schedule = self.schedules.get(self.kernel, len(run), end - first)
            outputs.append(self.kernel.run(
                query, slice(first, end), metadata.query_start_loc, metadata.seq_lens,
                metadata.block_table, schedule,
            ))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # [T, K, hd]
        if asked != ascending:  # columns in the asked order (the packed slots' order)
            column = {head: i for i, head in enumerate(ascending)}
            output = output.index_select(1, torch.tensor([column[h] for h in asked], device=heads.device))
        return output.reshape(num_tokens, -1)


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


class Schedules:
    """The kernel's work partitions for the step's requests, per head count, shared by all layers.

    Every layer of a step attends the same requests, so a partition computed
    for (heads, KV heads) serves every later layer with the same counts.
    """

    def __init__(self) -> None:
        self._metadata = None
        self._by_heads: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, kernel: CpuPagedAttention, num_heads: int, num_kv_heads: int) -> torch.Tensor:
        metadata = kernel.metadata
        if metadata is not self._metadata:  # a new step
            self._metadata, self._by_heads = metadata, {}
        key = (num_heads, num_kv_heads)
        if key not in self._by_heads:
            self._by_heads[key] = kernel.schedule(num_heads, num_kv_heads, metadata.query_start_loc, metadata.seq_lens)
        return self._by_heads[key]


def attend_every_head(attention: torch.nn.Module, q, k, v) -> AllHeadsAttention:
    """vLLM's own attention (KV-cache write and every head), as the unpruned layer runs it."""
    return AllHeadsAttention(attention(q, k, v))


def attend_kept_heads(attention: torch.nn.Module, q, k, v, batch: StepBatch, schedules: Schedules) -> KeptHeadsAttention:
    """Write this step's K/V of every head; attention itself runs when asked."""
    write_kv_cache(attention, k, v)
    return KeptHeadsAttention(attention, q, k, v, batch, schedules)
