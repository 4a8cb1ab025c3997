"""GEMMs that read a weight's kept rows in place, by index (Triton): no packed copy.

A pruned block's kept units are rows of its weights: output rows of the input
projection (gate_up, fc1) and input rows of the output projection's transposed
weight (o_proj, down, fc2). Packing copies those rows into buffers at every
changed decision (vllm_pp/runtime/execution.py, ``PackedUnits``), which costs
a copy and memory; these kernels read them where they are:

* :func:`gather_rows_linear`: ``x @ W[rows].T`` (the kept rows are output features);
* :func:`gather_rows_matmul`: ``a @ Wt[rows]`` (the kept rows are input features,
  ``Wt`` being the output projection's weight stored transposed).

Index tensors live on the device, so nothing waits for it and a CUDA graph can
hold the calls. Triton's interpreter (``TRITON_INTERPRET=1``) runs them on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32


@functools.cache
def _kernels():
    """The Triton kernel, made on first use (the interpreter is chosen by the environment then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gathered_matmul_kernel(
        a, weight, rows, out, M, N, K, stride_am, stride_w, stride_om,
        GATHER_N: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[m, n] = sum_k a[m, k] * b[k, n], where b[k, n] is weight[rows[n], k]
        (GATHER_N: kept output rows) or weight[rows[k], n] (kept input rows)."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        if GATHER_N:
            row_n = tl.load(rows + n, mask=n < N, other=0)
        accumulator = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(a + m[:, None] * stride_am + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            if GATHER_N:
                address = weight + row_n[None, :] * stride_w + k[:, None]
            else:
                row_k = tl.load(rows + k, mask=k < K, other=0)
                address = weight + row_k[:, None] * stride_w + n[None, :]
            w = tl.load(address, mask=(k[:, None] < K) & (n[None, :] < N), other=0.0)  # [BLOCK_K, BLOCK_N]
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            accumulator += tl.dot(x, w)
        tl.store(out + m[:, None] * stride_om + n[None, :], accumulator.to(out.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))

    return gathered_matmul_kernel


def _upcast() -> bool:
    """Half-precision tiles go to float32 before tl.dot under Triton's interpreter, whose
    numpy arithmetic has no bfloat16; compiled, tl.dot takes them as they are."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gathered_matmul(a: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, n: int, gather_n: bool):
    if a.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("the activations and the weight need contiguous rows")
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    _kernels()[(-(-a.shape[0] // BLOCK_M), -(-n // BLOCK_N))](
        a, weight, rows, out, a.shape[0], n, a.shape[1], a.stride(0), weight.stride(0), out.stride(0),
        GATHER_N=gather_n, UPCAST=_upcast(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


def gather_rows_linear(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x @ weight[rows].T``: x ``[M, K]``, weight ``[R, K]`` (rows contiguous), rows ``[N]`` -> ``[M, N]``."""
    return _gathered_matmul(x, weight, rows, rows.numel(), gather_n=True)


def gather_rows_matmul(a: torch.Tensor, weight_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``a @ weight_t[rows]``: a ``[M, K]``, weight_t ``[R, N]`` (rows contiguous), rows ``[K]`` -> ``[M, N]``."""
    if a.shape[1] != rows.numel():
        raise ValueError(f"a has {a.shape[1]} columns for {rows.numel()} rows")
    return _gathered_matmul(a, weight_t, rows, weight_t.shape[1], gather_n=False)
