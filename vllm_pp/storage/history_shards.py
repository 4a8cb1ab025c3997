"""The live history across restarts and crashes: ``--pp-history DIR``.

Each TP rank (an mp worker or a Ray actor, possibly on another host) owns its
shard of the history and keeps it in its own files, so no rank waits on another.
The history is written in numbered *checkpoint rounds*: the engine core starts
round ``n`` on every rank at once (periodically, and a last one at clean
shutdown), and each rank writes ``DIR/rank{r}.round{n:06d}.safetensors``
atomically (vllm_pp/storage/statistics.py: a crash leaves the previous file or
the complete new one, never a torn one). A rank keeps its two newest rounds, so
that when a crash cut a round short on some ranks, the round before it is still
complete on all of them.

At start-up the engine core asks every rank which rounds it holds (each rank
checks their headers: a shard written for another model, TP size, rank or
history layout is refused, whichever round it is) and has them all load the
newest round that every rank holds (:func:`common_round`): ranks never mix rounds.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vllm_pp.config import ProbePruningConfigError
from vllm_pp.storage.statistics import ShardOwner, check_metadata, load_statistics, save_statistics

KIND = "history"
# Rounds a rank keeps: the newest and the one before (see the module docstring).
KEPT_ROUNDS = 2
_SHARD_NAME = re.compile(r"^rank(\d+)\.round(\d+)\.safetensors$")


def shard_path(directory: str | Path, rank: int, round_index: int) -> Path:
    return Path(directory) / f"rank{rank}.round{round_index:06d}.safetensors"


def saved_rounds(directory: str | Path, rank: int) -> list[int]:
    """The rounds ``rank`` has complete files of, oldest first (temporary files are
    hidden names and never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    rounds = []
    for entry in directory.iterdir():
        match = _SHARD_NAME.match(entry.name)
        if match and int(match.group(1)) == rank:
            rounds.append(int(match.group(2)))
    return sorted(rounds)


def common_round(rounds_per_rank: Sequence[Sequence[int]]) -> int | None:
    """The newest round every rank holds; None when there is none (a first start,
    or ranks with no round in common: then every rank starts from calibration)."""
    if not rounds_per_rank:
        return None
    shared = set(rounds_per_rank[0]).intersection(*map(set, rounds_per_rank[1:]))
    return max(shared, default=None)


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
    directory: str | Path, owner: ShardOwner, layout: Mapping, round_index: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's tensors of round ``round_index`` and the file's metadata, refused
    as :func:`check_history_shard` refuses (one read of the header)."""
    path = shard_path(directory, owner.rank, round_index)
    tensors, metadata = load_statistics(path, kind=KIND, owner=owner)
    _check_rank_and_layout(path, metadata, owner, layout)
    return tensors, metadata


def check_history_shard(directory: str | Path, owner: ShardOwner, layout: Mapping, round_index: int) -> dict:
    """The metadata of this rank's shard of round ``round_index``, read from its header.

    A shard of another model, TP size, rank or history layout (``layout``: bucket
    size and count) is refused with a one-line error, never reinterpreted.
    """
    path = shard_path(directory, owner.rank, round_index)
    metadata = check_metadata(path, kind=KIND, owner=owner)
    _check_rank_and_layout(path, metadata, owner, layout)
    return metadata


def _check_rank_and_layout(path: Path, metadata: dict, owner: ShardOwner, layout: Mapping) -> None:
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


def save_history_shard(
    directory: str | Path,
    owner: ShardOwner,
    tensors: Mapping[str, torch.Tensor],
    layout: Mapping,
    *,
    round_index: int,
    steps: int,
) -> Path:
    """Write this rank's shard of round ``round_index`` atomically, then drop its
    rounds older than the newest :data:`KEPT_ROUNDS`.

    ``tensors`` are named per rank already; ``steps`` counts the served steps the
    history has learned from, over every start of this directory.
    """
    directory = Path(directory)
    path = shard_path(directory, owner.rank, round_index)
    # A write cut short by a crash leaves its temporary file; this rank has one
    # writer, so any of its temporary files is such a leftover.
    for stale in directory.glob(f".rank{owner.rank}.round*.tmp"):
        stale.unlink(missing_ok=True)
    save_statistics(
        path,
        tensors,
        {
            "kind": KIND,
            "model": owner.identity,
            "tensor_parallel_size": owner.tp_size,
            "tensor_parallel_rank": owner.rank,
            "layout": dict(layout),
            "round": round_index,
            "steps": steps,
            "saved_at": time.time(),
        },
    )
    for old in saved_rounds(directory, owner.rank)[:-KEPT_ROUNDS]:
        shard_path(directory, owner.rank, old).unlink(missing_ok=True)
    return path
