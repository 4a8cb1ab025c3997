"""Pruned execution: the one place that turns kept heads/channels into compute.

Given the kept units of a block, these run the block's linears on the kept
rows (column-parallel) or columns (row-parallel) of vLLM's own weights,
mirroring what vLLM's parallel linears do around the GEMM (bias once,
all-reduce across TP ranks). They never touch attention or the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_pp.algorithm.selection import kept_heads_to_channels
from vllm_pp.vllm_compat import all_reduce_row_parallel


def column_parallel_rows(linear, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` restricted to output ``rows`` (a ColumnParallelLinear shard): [T, len(rows)]."""
    bias = None if linear.bias is None else linear.bias.index_select(0, rows)
    return F.linear(x, linear.weight.index_select(0, rows), bias)


def row_parallel_columns(
    linear, x_kept: torch.Tensor, columns: torch.Tensor, correction: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear`` applied to an input that is zero outside ``columns``: [T, K] -> [T, out].

    ``correction`` ([out], this rank's share) joins the partial sum before the
    all-reduce. The bias is added once, after the all-reduce, as
    RowParallelLinear does (it adds it on rank 0 only).
    """
    output = F.linear(x_kept, linear.weight.index_select(1, columns))
    if correction is not None:
        output = output + correction
    output = all_reduce_row_parallel(output, linear)
    if linear.bias is not None and not linear.skip_bias_add:
        output = output + linear.bias
    return output


def attention_output(
    o_proj, heads_out: torch.Tensor, kept_heads: torch.Tensor, head_dim: int, correction=None
):
    """o_proj over the kept heads only.

    heads_out: [T, local_heads * head_dim], the attention output of every head.
    Returns (output [T, hidden], kept activations [T, K * head_dim]).
    """
    columns = kept_heads_to_channels(kept_heads, head_dim)
    kept_out = heads_out.index_select(1, columns)
    return row_parallel_columns(o_proj, kept_out, columns, correction), kept_out


def gated_mlp(gate_up_proj, act_fn, down_proj, x: torch.Tensor, kept: torch.Tensor, correction=None):
    """LLaMA MLP on kept intermediate channels.

    gate_up_proj's local rows are [gate (I_local) | up (I_local)]; channel c
    needs gate row c and up row I_local + c.
    Returns (output [T, hidden], intermediate [T, K]).
    """
    width = down_proj.input_size_per_partition
    gate_up = column_parallel_rows(gate_up_proj, x, torch.cat([kept, kept + width]))
    intermediate = act_fn(gate_up)
    return row_parallel_columns(down_proj, intermediate, kept, correction), intermediate


def plain_mlp(fc1, act_fn, fc2, x: torch.Tensor, kept: torch.Tensor, correction=None):
    """OPT MLP (fc1, activation, fc2) on kept channels: (output [T, hidden], intermediate [T, K])."""
    intermediate = act_fn(column_parallel_rows(fc1, x, kept))
    return row_parallel_columns(fc2, intermediate, kept, correction), intermediate
