"""Decode attention on a step's kept query heads, over vLLM's paged KV cache (Triton).

At a decode step each request has one query token, and attention reads the
request's whole context from the KV cache: at long contexts that read is the
step's cost. With heads pruned, only the KV heads that some kept query head
attends to need reading. :func:`kept_head_decode_attention` runs one program
per (request, KV head): a KV head none of whose query heads is kept returns at
once without reading the cache; otherwise its pages are read once for all of
its kept query heads (grouped-query attention shares a KV head among
``group_size`` query heads, so under GQA the saving needs whole groups pruned).

Layout, as vLLM's GPU backends keep the cache: ``key_cache`` and
``value_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]`` views
with any strides (vLLM 0.32 packs K and V of a head and slot side by side:
``kv_cache.transpose(1, 2).split(head_dim, dim=-1)`` gives both views). The
kept heads come as a device tensor, so nothing waits for the device and a CUDA
graph can hold the call. Triton's interpreter (``TRITON_INTERPRET=1``) runs it
on the CPU.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():
    """The Triton kernel, made on first use (the interpreter is chosen by the environment then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kept_head_decode(
        query, key_cache, value_cache, output, block_table, seq_lens, head_slots, scale,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_bt,
        GROUP_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        request = tl.program_id(0)
        kv_head = tl.program_id(1)
        group = tl.arange(0, GROUP)  # query heads of this KV head (padded to a power of 2)
        heads = kv_head * GROUP_SIZE + group
        slots = tl.load(head_slots + heads, mask=group < GROUP_SIZE, other=-1)  # -1: not kept
        kept = slots >= 0
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(query + request * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                    mask=kept[:, None], other=0.0).to(tl.float32)  # [GROUP, HEAD_DIM]
        seq_len = tl.load(seq_lens + request)
        # No kept query head reads this KV head: no page of its cache is read.
        num_pages = tl.where(tl.max(kept.to(tl.int32), axis=0) > 0, tl.cdiv(seq_len, BLOCK_SIZE), 0)
        running_max = tl.full([GROUP], float("-inf"), tl.float32)
        denominator = tl.zeros([GROUP], tl.float32)
        accumulator = tl.zeros([GROUP, HEAD_DIM], tl.float32)
        tokens_in_page = tl.arange(0, BLOCK_SIZE)
        for page in range(0, num_pages):
            block = tl.load(block_table + request * stride_bt + page)
            valid = page * BLOCK_SIZE + tokens_in_page < seq_len
            offsets = block * stride_kb + tokens_in_page[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
            k = tl.load(key_cache + offsets, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, HEAD_DIM]
            v_offsets = block * stride_vb + tokens_in_page[:, None] * stride_vs + kv_head * stride_vh + dims[None, :]
            v = tl.load(value_cache + v_offsets, mask=valid[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP, BLOCK]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max[:, None])
            denominator = denominator * correction + tl.sum(weights, axis=1)
            accumulator = accumulator * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            running_max = new_max
        result = accumulator / tl.where(kept, denominator, 1.0)[:, None]
        tl.store(output + request * stride_ot + slots[:, None] * stride_oh + dims[None, :],
                 result.to(output.dtype.element_ty), mask=kept[:, None])

    return kept_head_decode


def head_slots(kept_heads: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[num_heads]`` int32: each kept head's column in the output (its rank in
    ``kept_heads``), -1 for the others. Fixed-size, no synchronisation."""
    slots = torch.full((num_heads,), -1, dtype=torch.int32, device=kept_heads.device)
    return slots.scatter_(0, kept_heads, torch.arange(kept_heads.numel(), dtype=torch.int32, device=kept_heads.device))


def kept_head_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_heads: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per request on the ``kept_heads`` only.

    query ``[R, H, hd]`` (one token per request; rotary applied); key_cache,
    value_cache ``[num_blocks, block_size, KV, hd]`` (any strides, last one 1);
    block_table ``[R, max_blocks]`` int32; seq_lens ``[R]`` (context including
    the query token, whose K/V are already in the cache); kept_heads ``[K]``
    (any order). Returns ``[R, K, hd]``, column j for ``kept_heads[j]``.
    """
    num_requests, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("the head dimension of query and caches must be contiguous")
    group_size = num_heads // num_kv_heads
    output = torch.empty(num_requests, kept_heads.numel(), head_dim, dtype=query.dtype, device=query.device)
    _kernel()[(num_requests, num_kv_heads)](
        query, key_cache, value_cache, output, block_table, seq_lens,
        head_slots(kept_heads, num_heads), scale,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        output.stride(0), output.stride(1),
        block_table.stride(0),
        GROUP_SIZE=group_size, GROUP=max(1, 1 << (group_size - 1).bit_length()),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
    )
    return output
