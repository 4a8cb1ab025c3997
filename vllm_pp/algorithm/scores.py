"""Channel and head importance scores (docs/algorithm.md 3.1, 3.2 and 5).

``W_out`` is the output projection's weight ``[D_out, C]`` (o_proj: ``C = H * hd``,
down_proj: ``C = I``); channel ``k`` is its input column ``k``. Under tensor
parallelism each rank passes its local column shard and local heads. All
scores are float32.
"""

import torch
from torch import Tensor


def channel_weight_norm(w_out: Tensor) -> Tensor:
    """``||W[:, k]^2||_2 = sqrt(sum_i W[i, k]^4)`` per input channel.

    w_out: ``[D, C]``. Returns ``[C]`` float32. Weight-only, so serving computes
    it once at load time.
    """
    return torch.linalg.vector_norm(w_out.float().square(), ord=2, dim=0)


def mlp_channel_scores(fused: Tensor, weight_norm: Tensor) -> Tensor:
    """PPsp channel score ``||c_k * W[:, k]^2||_2 = c_k * weight_norm_k`` (docs/algorithm.md 3.1).

    fused: ``[C]`` fused statistic ``c >= 0``; weight_norm: ``[C]`` from
    :func:`channel_weight_norm`. Returns ``[C]``.
    """
    return fused.float() * weight_norm.float()


def _per_head(channel_scores: Tensor, num_heads: int) -> Tensor:
    """View ``[H * hd]`` channel scores as ``[H, hd]`` (heads own contiguous columns)."""
    if channel_scores.numel() % num_heads:
        raise ValueError(f"{channel_scores.numel()} channels do not split into {num_heads} heads")
    return channel_scores.float().view(num_heads, -1)


def attention_head_scores(fused: Tensor, weight_norm: Tensor, num_heads: int) -> Tensor:
    """PPsp head score: L2 norm of ``c_k * W[i, k]^2`` over head h's ``D x hd`` block (docs/algorithm.md 3.2).

    Since ``sum_{i,k in h} c_k^2 W[i,k]^4 = sum_{k in h} (c_k * weight_norm_k)^2``,
    this is the L2 norm of the head's per-channel scores, which avoids touching
    W per step. fused, weight_norm: ``[H * hd]``. Returns ``[H]``.
    """
    channel = mlp_channel_scores(fused, weight_norm)
    return torch.linalg.vector_norm(_per_head(channel, num_heads), ord=2, dim=1)


def wanda_sp_channel_scores(w_out: Tensor, sq_mean: Tensor) -> Tensor:
    """Wanda-sp channel score ``sum_i |W[i, k]| * sqrt(E[x_k^2])`` (docs/algorithm.md 5).

    w_out: ``[D, C]``; sq_mean: ``[C]`` calibration mean of ``x_k^2``. Returns ``[C]``.
    """
    return w_out.float().abs().sum(dim=0) * sq_mean.float().sqrt()


def wanda_sp_head_scores(channel_scores: Tensor, num_heads: int) -> Tensor:
    """Wanda-sp head score: sum of the head's channel scores. ``[H * hd] -> [H]``."""
    return _per_head(channel_scores, num_heads).sum(dim=1)


def flap_channel_scores(w_out: Tensor, variance: Tensor) -> Tensor:
    """FLAP fluctuation score ``Var(x_k) * ||W[:, k]||_2^2`` (docs/algorithm.md 5).

    w_out: ``[D, C]``; variance: ``[C]`` calibration variance of ``x_k``. Returns ``[C]``.
    """
    return variance.float() * w_out.float().square().sum(dim=0)


def flap_head_scores(channel_scores: Tensor, num_heads: int) -> Tensor:
    """FLAP head score: mean of the head's channel scores. ``[H * hd] -> [H]``.

    FLAP standardises the channel scores of a layer *before* this reduction;
    :func:`vllm_pp.algorithm.selection.flap_allocation` does both in that order.
    For a uniform per-layer ratio the raw head means rank heads identically.
    """
    return _per_head(channel_scores, num_heads).mean(dim=1)


def flap_bias_compensation(w_out: Tensor, mean: Tensor, pruned: Tensor) -> Tensor:
    """Bias standing in for the pruned channels at their calibration mean.

    ``b = W[:, pruned] @ mean[pruned]``.
    w_out: ``[D, C]``; mean: ``[C]``; pruned: LongTensor ``[P]``. Returns ``[D]``
    float32, to be added to the output projection's output.
    """
    return w_out[:, pruned].float() @ mean[pruned].float()
