"""What several benchmarks share: timing a call on any device, writing a results file."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def median_ms(call, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``call()``: CUDA events on CUDA (L2 not flushed), wall time elsewhere."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def write_results(out: Path, results: dict) -> Path:
    """``results`` as indented JSON at ``out`` (its folder made); prints and returns the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(out)
    return out
