"""Decode attention over the paged KV cache: every head against the kept heads only.

For decode batches of several sizes and context lengths (default: LLaMA-2-7B
attention, 32 heads of 128, MHA), times

* ``kernel-all``: vllm_pp/runtime/paged_attention.py on every head;
* ``kernel-kept``: the same kernel on the kept heads (``--kept`` share, 56% at
  ratio 0.4), whose KV heads alone are read;
* ``sdpa``: torch's scaled-dot-product attention on every head over a
  contiguous cache (the external reference, no paging);

and reports milliseconds, the KV bytes each reads, the bandwidth that implies,
and the ratios (kernel-all / kernel-kept; kernel-all / sdpa).

    python benchmarks/kept_head_attention.py                      # CUDA, bf16
    python benchmarks/kept_head_attention.py --device cpu --dtype float32 \\
        --batches 2 --contexts 64 --heads 4 --head-dim 32         # the interpreter, a smoke run

On the CPU the kernel runs in Triton's interpreter (set here): its times say
nothing about speed. Writes benchmarks/results/kept_head_attention_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from common import median_ms, write_results  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16
H200_BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e


def log(message: str) -> None:
    print(f"[kept_head_attention] {message}", file=sys.stderr, flush=True)


def case(batch: int, context: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    from vllm_pp.runtime.paged_attention import kept_head_decode_attention

    generator = torch.Generator().manual_seed(batch * 100_003 + context)
    heads, kv_heads, head_dim = args.heads, args.kv_heads or args.heads, args.head_dim
    pages = -(-context // BLOCK_SIZE)
    # vLLM 0.32's packed layout: [blocks, KV, block, 2 * hd], K and V side by side.
    kv = torch.randn(batch * pages, kv_heads, BLOCK_SIZE, 2 * head_dim, generator=generator).to(device, dtype)
    key_cache, value_cache = kv.transpose(1, 2).split(head_dim, dim=-1)
    block_table = torch.randperm(batch * pages, generator=generator).view(batch, pages).to(device, torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, heads, head_dim, generator=generator).to(device, dtype)
    keep = max(1, round(args.kept * heads))
    kept = torch.randperm(heads, generator=generator)[:keep].sort().values.to(device)
    every = torch.arange(heads, device=device)
    # The contiguous cache of the same context, for torch's attention.
    k = key_cache[block_table.long()].reshape(batch, pages * BLOCK_SIZE, kv_heads, head_dim)[:, :context]
    v = value_cache[block_table.long()].reshape(batch, pages * BLOCK_SIZE, kv_heads, head_dim)[:, :context]
    k, v = (t.transpose(1, 2).contiguous() for t in (k, v))  # [B, KV, S, hd]
    q = query.unsqueeze(2)  # [B, H, 1, hd]
    scale = head_dim**-0.5

    def kernel(heads_asked):
        return lambda: kept_head_decode_attention(query, key_cache, value_cache, block_table, seq_lens, heads_asked, scale)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=kv_heads != heads)

    kv_bytes_per_head = 2 * batch * context * head_dim * kv.element_size()
    group = heads // kv_heads
    read_kv_heads = len({h // group for h in kept.tolist()})
    result = {"batch": batch, "context": context, "kept_heads": keep, "kv_heads_read_kept": read_kv_heads}
    for name, call, kv_heads_read in (("kernel-all", kernel(every), kv_heads), ("kernel-kept", kernel(kept), read_kv_heads),
                                      ("sdpa", sdpa, kv_heads)):
        ms = median_ms(call, device, args.repeats, warmup=2)
        result[name] = {"ms": ms, "kv_bytes": kv_bytes_per_head * kv_heads_read,
                        "bandwidth_bytes_per_s": kv_bytes_per_head * kv_heads_read / (ms / 1e3)}
    result["kept_speedup"] = result["kernel-all"]["ms"] / result["kernel-kept"]["ms"]
    result["all_vs_sdpa"] = result["kernel-all"]["ms"] / result["sdpa"]["ms"]
    result["kernel-all"]["share_of_h200_bandwidth"] = result["kernel-all"]["bandwidth_bytes_per_s"] / H200_BANDWIDTH
    # The kept heads' output equals every head's output on those heads.
    difference = (kernel(kept)().float() - kernel(every)()[:, kept].float()).abs().max().item()
    result["kept_vs_all_max_abs_difference"] = difference
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, help="default: as many as heads (MHA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kept", type=float, default=0.56, help="share of query heads kept")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first made
    started = time.monotonic()
    cases = []
    for batch in args.batches:
        for context in args.contexts:
            cases.append(case(batch, context, args, device, getattr(torch, args.dtype)))
            log(f"batch {batch}, context {context}: {cases[-1]}")
    results = {
        "command": " ".join(["python", "benchmarks/kept_head_attention.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
        "head_dim": args.head_dim, "block_size": BLOCK_SIZE, "kept": args.kept, "repeats": args.repeats,
        "timing": "CUDA events, median" if device.type == "cuda" else "wall time, median", "cases": cases,
        "seconds": time.monotonic() - started,
    }
    write_results(args.out or RESULTS / f"kept_head_attention_{device.type}.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
