"""The live history across restarts: ``--pp-history DIR``.

Each TP rank (an mp worker or a Ray actor, possibly on another host) owns its
shard of the history and keeps it in its own file, ``DIR/rank{r}.safetensors``,
so no rank waits on another at shutdown. A shard is loaded at start-up when it
exists (a missing directory or shard is a first start: the history starts from
calibration) and is written atomically when the engine shuts down cleanly
(``vllm_pp.integration.runtime_patches`` hooks ``EngineCore.shutdown``). A shard written for another
model, TP size, rank or history layout is refused at start-up.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping

import torch

from vllm_pp.config import ProbePruningConfigError
from vllm_pp.storage.statistics import ShardOwner, load_statistics, save_statistics

KIND = "history"


def shard_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.safetensors"


def check_history_directory(directory: str | Path) -> None:
    """Make ``directory`` if missing and prove that shards can be saved there: a probe
    file is written, renamed (as every save does) and removed. One-line error otherwise."""
    where = f"probe_pruning.history.path={str(directory)!r}"
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ProbePruningConfigError(f"{where} cannot be created: {err.strerror}") from None
    probe = directory / f".vllm-pp-write-check-{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"vllm-pp")
        os.replace(probe, probe.with_suffix(".done"))
        probe.with_suffix(".done").unlink()
    except OSError as err:
        probe.unlink(missing_ok=True)
        raise ProbePruningConfigError(
            f"{where} is not a directory where history shards can be written and renamed: {err.strerror}"
        ) from None


def load_history_shard(
    directory: str | Path, owner: ShardOwner, layout: Mapping
) -> dict[str, torch.Tensor] | None:
    """This rank's saved history tensors, or None on a first start.

    ``layout`` describes the history's shape (bucket size, bucket count); a
    shard saved with another layout is refused rather than reinterpreted.
    """
    path = shard_path(directory, owner.rank)
    if not path.exists():
        return None
    tensors, metadata = load_statistics(path, kind=KIND, owner=owner)
    if metadata.get("tensor_parallel_rank") != owner.rank:
        raise ProbePruningConfigError(
            f"history shard {str(path)!r} belongs to rank {metadata.get('tensor_parallel_rank')}, "
            f"expected rank {owner.rank}"
        )
    if metadata.get("layout") != dict(layout):
        raise ProbePruningConfigError(
            f"history shard {str(path)!r} has layout {metadata.get('layout')}, this server uses "
            f"{dict(layout)}: use another --pp-history directory or the same history settings"
        )
    return tensors


def save_history_shard(
    directory: str | Path, owner: ShardOwner, tensors: Mapping[str, torch.Tensor], layout: Mapping
) -> Path:
    """Write this rank's shard atomically; ``tensors`` are named per rank already."""
    path = shard_path(directory, owner.rank)
    save_statistics(
        path,
        tensors,
        {
            "kind": KIND,
            "model": owner.identity,
            "tensor_parallel_size": owner.tp_size,
            "tensor_parallel_rank": owner.rank,
            "layout": dict(layout),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return path
