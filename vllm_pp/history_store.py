"""The live history across restarts: ``--pp-history DIR``.

Each TP rank (an mp worker or a Ray actor, possibly on another host) owns its
shard of the history and keeps it in its own file, ``DIR/rank{r}.safetensors``,
so no rank waits on another at shutdown. A shard is loaded at start-up when it
exists (a missing directory or shard is a first start: the history starts from
calibration) and is written atomically when the engine shuts down cleanly
(``runtime_patches`` hooks ``EngineCore.shutdown``). A shard written for another
model, TP size, rank or history layout is refused at start-up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch

from vllm_pp.config import ProbePruningConfigError
from vllm_pp.methods.base import WorkerInfo
from vllm_pp.statistics import load_statistics, save_statistics

KIND = "history"


def shard_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.safetensors"


def load_history_shard(
    directory: str | Path, worker: WorkerInfo, layout: Mapping
) -> dict[str, torch.Tensor] | None:
    """This rank's saved history tensors, or None on a first start.

    ``layout`` describes the history's shape (bucket size, bucket count); a
    shard saved with another layout is refused rather than reinterpreted.
    """
    path = shard_path(directory, worker.tp_rank)
    if not path.exists():
        return None
    tensors, metadata = load_statistics(
        path, kind=KIND, identity=worker.model_identity, tp_size=worker.tp_size, rank=worker.tp_rank
    )
    if metadata.get("tensor_parallel_rank") != worker.tp_rank:
        raise ProbePruningConfigError(
            f"history shard {str(path)!r} belongs to rank {metadata.get('tensor_parallel_rank')}, "
            f"expected rank {worker.tp_rank}"
        )
    if metadata.get("layout") != dict(layout):
        raise ProbePruningConfigError(
            f"history shard {str(path)!r} has layout {metadata.get('layout')}, this server uses "
            f"{dict(layout)}: use another --pp-history directory or the same history settings"
        )
    return tensors


def save_history_shard(
    directory: str | Path, worker: WorkerInfo, tensors: Mapping[str, torch.Tensor], layout: Mapping
) -> Path:
    """Write this rank's shard atomically; ``tensors`` are named per rank already."""
    path = shard_path(directory, worker.tp_rank)
    save_statistics(
        path,
        tensors,
        {
            "kind": KIND,
            "model": worker.model_identity,
            "tensor_parallel_size": worker.tp_size,
            "tensor_parallel_rank": worker.tp_rank,
            "layout": dict(layout),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return path
