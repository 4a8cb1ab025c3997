"""Decode attention on the kept heads (vllm_pp/runtime/paged_attention.py) against plain torch.

The Triton kernel runs in Triton's interpreter here (TRITON_INTERPRET=1); on a
CUDA machine the same tests run it compiled. The reference gathers each
request's context from the paged cache and attends with torch, in float64.
"""

from __future__ import annotations

import pytest
import torch

from vllm_pp.runtime import paged_attention



def paged_cache(contexts, num_kv_heads, head_dim, block_size, dtype, generator, packed, device):
    """K and V of every request in shuffled pages; vLLM 0.32's packed layout when ``packed``."""
    num_blocks = sum(-(-c // block_size) for c in contexts) + 3
    shape = (num_blocks, num_kv_heads, block_size, 2 * head_dim) if packed else (num_blocks, block_size, num_kv_heads, head_dim)
    if packed:
        kv = torch.randn(shape, generator=generator).to(device, dtype)
        key_cache, value_cache = kv.transpose(1, 2).split(head_dim, dim=-1)
    else:
        key_cache = torch.randn(shape, generator=generator).to(device, dtype)
        value_cache = torch.randn(shape, generator=generator).to(device, dtype)
    pages = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(-(-c // block_size) for c in contexts)
    block_table = torch.zeros(len(contexts), width, dtype=torch.int32)
    for request, context in enumerate(contexts):
        for page in range(-(-context // block_size)):
            block_table[request, page] = pages.pop()
    return key_cache, value_cache, block_table.to(device)


def reference(query, key_cache, value_cache, block_table, contexts, kept, scale):
    """[R, K, hd] in float64: each kept head over its request's gathered context."""
    num_heads, block_size, num_kv_heads = query.shape[1], key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = []
    for request, context in enumerate(contexts):
        pages = block_table[request, : -(-context // block_size)].long()
        k = key_cache[pages].reshape(-1, num_kv_heads, key_cache.shape[-1])[:context].double()
        v = value_cache[pages].reshape(-1, num_kv_heads, value_cache.shape[-1])[:context].double()
        rows = []
        for head in kept.tolist():
            weights = torch.softmax(k[:, head // group] @ query[request, head].double() * scale, dim=0)
            rows.append(weights @ v[:, head // group])
        out.append(torch.stack(rows))
    return torch.stack(out)


# Every dtype on vLLM's packed layout with 16-token blocks; separate K/V caches with 32-token blocks.
LAYOUTS = [(dtype, 16, True) for dtype in (torch.float32, torch.float16, torch.bfloat16)] + [(torch.float32, 32, False)]


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype, block_size, packed", LAYOUTS, ids=["fp32", "fp16", "bf16", "separate-32"])
def test_kept_heads_equal_plain_attention_over_the_gathered_context(num_heads, num_kv_heads, block_size, dtype, packed,
                                                                   device):
    generator = torch.Generator().manual_seed(0)
    head_dim, contexts = 32, [1, 17, 50, 33]
    key_cache, value_cache, block_table = paged_cache(contexts, num_kv_heads, head_dim, block_size, dtype, generator, packed, device)
    query = torch.randn(len(contexts), num_heads, head_dim, generator=generator).to(device, dtype)
    seq_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for kept in (torch.arange(num_heads), torch.tensor([num_heads - 1, 0, 2])):  # every head; a subset, any order
        kept = kept.to(device)
        got = paged_attention.kept_head_decode_attention(
            query, key_cache, value_cache, block_table, seq_lens, kept, scale=head_dim**-0.5)
        assert got.shape == (len(contexts), kept.numel(), head_dim) and got.dtype == dtype
        want = reference(query, key_cache, value_cache, block_table.cpu(), contexts, kept.cpu(), head_dim**-0.5)
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tolerance, atol=tolerance)


def test_a_pruned_kv_group_leaves_the_kept_heads_alone(device):
    """A KV head none of whose query heads is kept (its program reads no page): NaN there
    reaches no kept head's output."""
    generator = torch.Generator().manual_seed(1)
    head_dim, contexts, num_heads, num_kv_heads = 16, [20, 5], 8, 4
    key_cache, value_cache, block_table = paged_cache(contexts, num_kv_heads, head_dim, 16, torch.float32, generator, False, device)
    key_cache[:, :, 1] = float("nan")  # KV head 1 serves query heads 2 and 3
    value_cache[:, :, 1] = float("nan")
    query = torch.randn(2, num_heads, head_dim, generator=generator).to(device)
    kept = torch.tensor([0, 1, 5, 6], device=device)
    got = paged_attention.kept_head_decode_attention(
        query, key_cache, value_cache, block_table, torch.tensor(contexts, dtype=torch.int32, device=device),
        kept, scale=0.25)
    assert torch.isfinite(got).all()
    want = reference(query, key_cache, value_cache, block_table.cpu(), contexts, kept.cpu(), 0.25)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)


def test_head_slots():
    slots = paged_attention.head_slots(torch.tensor([5, 0, 2]), 6)
    assert slots.tolist() == [1, -1, 2, -1, -1, 0]


def test_kept_head_attention_benchmark_runs(tmp_path):
    """benchmarks/kept_head_attention.py on the interpreter: every case, kept heads equal to all heads'."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "attention.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kept_head_attention.py"
    command = [sys.executable, str(script), "--device", "cpu", "--dtype", "float32", "--batches", "2",
               "--contexts", "20", "40", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
               "--repeats", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert [(c["batch"], c["context"]) for c in cases] == [(2, 20), (2, 40)]
    for c in cases:
        assert c["kept_vs_all_max_abs_difference"] <= 1e-6
        assert c["kernel-kept"]["kv_bytes"] <= c["kernel-all"]["kv_bytes"]
