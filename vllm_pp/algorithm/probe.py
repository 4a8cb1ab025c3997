"""Probe selection (spec 1.2), adapted to vLLM's flattened scheduler steps.

vLLM hands a layer all tokens of a step as one ``[T, D]`` matrix (prefill chunks
and single decode tokens of several requests, no padding). There is no
``[batch, seq]`` grid, so the paper's two-stage selection (tokens, then samples)
collapses to one stage: each token is ranked by the L2 norm of its own residual.
"""

import math

import torch
from torch import Tensor

from vllm_pp.algorithm.selection import top_k_indices


def token_importance(residual: Tensor) -> Tensor:
    """L2 norm of each token's residual stream, in float32.

    residual: ``[T, D]`` (any float dtype; bf16 squares would lose precision,
    hence the float32 accumulation). Returns ``[T]`` float32.
    """
    return torch.linalg.vector_norm(residual, ord=2, dim=-1, dtype=torch.float32)


def num_probe_tokens(num_tokens: int, probe_ratio: float, min_tokens: int = 1) -> int:
    """Number of probe tokens: ``min(T, max(min_tokens, ceil(T * probe_ratio)))``.

    ``ceil`` is applied to the float product, as in the official code, so
    e.g. ``ceil(100 * 0.07) == 8``.
    """
    if num_tokens < 0 or probe_ratio < 0 or min_tokens < 0:
        raise ValueError(
            f"need num_tokens, probe_ratio, min_tokens >= 0, got "
            f"{num_tokens}, {probe_ratio}, {min_tokens}"
        )
    return min(num_tokens, max(min_tokens, math.ceil(num_tokens * probe_ratio)))


def select_probe_tokens(importance: Tensor, num_probe: int) -> Tensor:
    """Indices of the ``num_probe`` most important tokens, in ascending order.

    importance: ``[T]``. Returns a LongTensor ``[num_probe]``; ascending order
    keeps each request's probe tokens in causal order (spec 1.2 sorts the kept
    indices by position). Ties go to the lower index.
    """
    return top_k_indices(importance, num_probe)
