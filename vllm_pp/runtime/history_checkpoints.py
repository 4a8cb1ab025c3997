"""History checkpoints while serving: when a round is due, and one rank's background writer.

The engine core owns a :class:`CheckpointSchedule` (which round, and when) and
starts each round on every rank at a step boundary; each rank's
:class:`HistoryWriter` copies the history to host memory there and writes the
file in a background thread (file format and rounds: vllm_pp/storage/history_shards.py).

What the step loop pays for a round is the copy to host memory. On an
accelerator the copy is queued on a side stream that waits for the steps before
it, and the compute stream waits for the copy before it updates the history
again: device-side ordering only, so the step path never waits for the device.
The writer thread waits for the copy instead.

A failed write (a full disk, a read-only or vanished directory) is logged once
per round, counted, and never reaches the step loop; the next round tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from vllm_pp.storage.history_shards import save_history_shard
from vllm_pp.storage.statistics import ShardOwner

logger = logging.getLogger("vllm.probe_pruning")


class CheckpointSchedule:
    """When the next round is due, and its number (the engine core's side).

    A round is due at the first step boundary ``interval`` seconds after the
    last one, if a model step ran since: an idle server has nothing new to save.
    ``interval`` 0 means rounds only at clean shutdown.
    """

    def __init__(self, interval: float, next_round: int, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.next_round = next_round
        self._clock = clock
        self._last = clock()
        self._stepped = False

    def after_step(self, model_executed: bool) -> int | None:
        """The round to start now, or None."""
        self._stepped |= model_executed
        if not self.interval or not self._stepped or self._clock() - self._last < self.interval:
            return None
        return self.start_round()

    def start_round(self) -> int:
        """Number a round started now (periodic or final)."""
        index, self.next_round = self.next_round, self.next_round + 1
        self._last, self._stepped = self._clock(), False
        return index


@dataclass
class CheckpointStatus:
    """One rank's checkpoint counters, for its metrics snapshot (host values only)."""

    loaded_round: int | None = None
    written: int = 0
    failed: int = 0
    skipped: int = 0  # rounds started while the previous write was still running
    last_round: int | None = None  # the newest round written
    last_written_at: float | None = None  # its time.time()

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class HistoryWriter:
    """Writes one rank's history rounds, one at a time, in a background thread."""

    def __init__(self, directory: str | Path, owner: ShardOwner, layout: Mapping) -> None:
        self.directory = directory
        self.owner = owner
        self.layout = dict(layout)
        self.status = CheckpointStatus()
        self._thread: threading.Thread | None = None
        self._host: dict[str, torch.Tensor] = {}  # reused host buffers (pinned for CUDA)
        self._side_stream = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def write(self, tensors: Mapping[str, torch.Tensor], round_index: int, steps: int, *, wait: bool) -> None:
        """Copy ``tensors`` (this rank's history) to host memory and write them as
        ``round_index``; in the background unless ``wait``.

        A round started while the previous write still runs is skipped (counted):
        the step loop never waits for a file system. ``wait`` (the last round, at
        clean shutdown) waits for both.
        """
        if self.busy:
            if not wait:
                self.status.skipped += 1
                logger.warning(
                    "Probe pruning history (rank %d): round %d skipped, round %d is still being written",
                    self.owner.rank, round_index, self.status.last_round or round_index - 1,
                )
                return
            self._thread.join()
        copied = self._copy_to_host(tensors)
        self._thread = threading.Thread(
            target=self._write, args=(copied, round_index, steps), name="vllm-pp-history", daemon=True
        )
        self._thread.start()
        if wait:
            self._thread.join()

    def _copy_to_host(self, tensors: Mapping[str, torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
        """Start the copy; return what the writer thread calls to get the finished host tensors."""
        for name, tensor in tensors.items():
            if name not in self._host:
                pin = tensor.device.type == "cuda"
                self._host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        first = next(iter(tensors.values()), None)
        if first is None or first.device.type != "cuda":
            for name, tensor in tensors.items():
                self._host[name].copy_(tensor)
            return lambda: self._host
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=first.device)
        compute = torch.cuda.current_stream(first.device)
        self._side_stream.wait_stream(compute)  # after the steps that wrote the history
        with torch.cuda.stream(self._side_stream):
            for name, tensor in tensors.items():
                self._host[name].copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        compute.wait_stream(self._side_stream)  # the next update waits for the copy

        def finished() -> dict[str, torch.Tensor]:  # in the writer thread
            copied.synchronize()
            return self._host

        return finished

    def _write(self, copied: Callable[[], dict[str, torch.Tensor]], round_index: int, steps: int) -> None:
        try:
            save_history_shard(
                self.directory, self.owner, copied(), self.layout, round_index=round_index, steps=steps
            )
        except Exception as err:  # OSError, or safetensors' own error for a failed write
            self.status.failed += 1
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            logger.warning(
                "Probe pruning history (rank %d): round %d could not be written to %s: %s; "
                "serving goes on, the next round tries again",
                self.owner.rank, round_index, self.directory, reason,
            )
            return
        self.status.written += 1
        self.status.last_round = round_index
        self.status.last_written_at = time.time()
