"""Probe selection (docs/algorithm.md 1.2), adapted to vLLM's flattened scheduler steps.

vLLM hands a layer all tokens of a step as one ``[T, D]`` matrix (prefill chunks
and single decode tokens of several requests, no padding). There is no
``[batch, seq]`` grid, so three selections are offered:

* ``strided`` (the default): a share of the step's tokens, evenly spaced over
  the step, which samples the step rather than its largest-norm tokens;
* ``tokens``: each token is ranked by the L2 norm of its own residual and the
  top share of the step's tokens is the probe;
* ``requests``: the paper's two stages with a request in the role of a sample:
  the top share of each request's tokens, then the requests whose kept tokens
  have the largest residual norm.
"""

import math

import torch
import torch.nn.functional as F
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
    keeps each request's probe tokens in causal order (the kept indices are
    sorted by position, docs/algorithm.md 1.2). Ties go to the lower index.
    """
    return top_k_indices(importance, num_probe)


def select_strided_tokens(num_tokens: int, num_probe: int, device=None) -> Tensor:
    """``num_probe`` tokens evenly spaced over the step's ``num_tokens``, ascending.

    Token ``floor((i + 1/2) * T / P)`` for ``i < P``: a sample that covers
    every request in proportion to its tokens, whatever their norms, chosen
    from the step's shape alone (no device values read). Returns a LongTensor
    ``[num_probe]``.
    """
    if not 0 <= num_probe <= num_tokens:
        raise ValueError(f"need 0 <= num_probe <= num_tokens, got {num_probe}, {num_tokens}")
    steps = torch.arange(num_probe, device=device, dtype=torch.long) * 2 + 1
    return torch.div(steps * num_tokens, 2 * num_probe, rounding_mode="floor")


def select_probe_requests(
    importance: Tensor, query_start_loc: Tensor, requests_ratio: float, tokens_ratio: float
) -> Tensor:
    """The paper's tokens-then-samples probe (docs/algorithm.md 1.2), with requests as samples.

    importance: ``[T]`` residual norm of each token; query_start_loc:
    ``[R + 1]``, request r owns tokens ``query_start_loc[r]:query_start_loc[r+1]``.
    Each request keeps its top ``ceil(tokens_ratio * len)`` tokens (at least
    one); a request's score is the L2 norm of its kept tokens' norms; the top
    ``ceil(requests_ratio * R)`` requests (at least one) form the probe.
    Positions are ranked within each request rather than across the batch,
    because requests of a step have different lengths. Returns a LongTensor of
    token indices in ascending order; ties go to the lower index.
    """
    num_tokens = importance.shape[0]
    lengths = query_start_loc[1:] - query_start_loc[:-1]  # [R]
    num_requests = lengths.shape[0]
    device = importance.device
    request = torch.repeat_interleave(
        torch.arange(num_requests, device=device), lengths, output_size=num_tokens
    )  # [T]
    # Order tokens by request, then by importance (descending, stable): the
    # position of a token in that order, minus its request's start, is its rank.
    by_importance = torch.sort(importance, descending=True, stable=True).indices
    order = by_importance[torch.sort(request[by_importance], stable=True).indices]
    rank = torch.empty(num_tokens, dtype=torch.long, device=device)
    rank[order] = torch.arange(num_tokens, device=device)
    rank -= query_start_loc.long()[request]
    kept_per_request = torch.ceil(lengths.double() * tokens_ratio).long().clamp(min=1)
    token_kept = rank < kept_per_request[request]  # [T] bool
    request_score = torch.zeros(num_requests, dtype=torch.float32, device=device).index_add_(
        0, request, torch.where(token_kept, importance.float().square(), 0.0)
    )
    num_kept_requests = min(num_requests, max(1, math.ceil(num_requests * requests_ratio)))
    kept_requests = top_k_indices(request_score, num_kept_requests)
    request_kept = torch.zeros(num_requests, dtype=torch.bool, device=device)
    request_kept[kept_requests] = True
    return torch.nonzero(token_kept & request_kept[request]).squeeze(1)


def probe_only_attention(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, requests: Tensor, scale: float
) -> Tensor:
    """The paper's attention probe (docs/algorithm.md 1.3): causal attention among the probe tokens only.

    q: ``[P, H, hd]``, k and v: ``[P, KV, hd]`` of the probe tokens (rotary
    already applied at their own positions); positions, requests: ``[P]``.
    A probe token attends to the probe tokens of its own request at the same
    or earlier positions, never to the rest of its context (serving uses the
    exact rows instead; this is kept to measure the difference). Returns the
    o_proj input of the probe tokens, ``[P, H * hd]``.
    """
    num_probe, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1).transpose(0, 1) for t in (k, v))  # [H, P, hd]
    allowed = (requests[:, None] == requests[None, :]) & (positions[None, :] <= positions[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1).reshape(num_probe, num_heads * head_dim)
